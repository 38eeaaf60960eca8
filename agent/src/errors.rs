//! The D-Bus error class of an operation's error ([`vmha_ops::OpError`] to [`crate::api::Error`]), for
//! the D-Bus objects and the jobs.

use crate::api::Error;

/// The D-Bus error class of an operation's error (the message stays the operation's).
pub fn op_error(e: vmha_ops::OpError) -> Error {
    use vmha_ops::OpError as E;
    let m = e.to_string();
    match e.cause() {
        E::Invalid(_) => Error::InvalidArgument(m),
        E::UnknownVm(_) => Error::UnknownVm(m),
        E::UnknownHost(_) => Error::UnknownHost(m),
        E::UnknownGroup(_) => Error::UnknownGroup(m),
        E::NotReady => Error::NotReady(m),
        E::NotQuorate => Error::NotQuorate(m),
        E::Conflict(_) => Error::Conflict(m),
        E::GuestRefused { .. } | E::DrainsRefused { .. } => Error::GuestRefused(m),
        E::GuestUnreachable { .. } => Error::GuestUnreachable(m),
        E::Hypervisor(_) => Error::Libvirt(m),
        E::Cib(_) => Error::Cib(m),
        _ => Error::Failed(m),
    }
}
