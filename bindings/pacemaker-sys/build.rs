//! Generates the raw bindings from the installed Pacemaker headers (Debian: pacemaker-dev, which pulls in
//! libglib2.0-dev, libxml2-dev and libqb-dev) and links libcib, libcrmcommon, libpacemaker, libxml2 and
//! glib, all found through pkg-config.

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=wrapper.h");
    let mut include_paths = Vec::new();
    // libpacemaker.pc requires pacemaker-cib, pacemaker (libcrmcommon) and the other client libraries.
    for lib in [
        "libpacemaker",
        "pacemaker-pe_status",
        "pacemaker-cib",
        "pacemaker",
        "libxml-2.0",
        "glib-2.0",
    ] {
        let found = pkg_config::Config::new()
            .probe(lib)
            .unwrap_or_else(|e| panic!("pkg-config {lib}: {e} (install pacemaker-dev)"));
        include_paths.extend(found.include_paths);
    }
    include_paths.dedup();

    let bindings = bindgen::Builder::default()
        .header("wrapper.h")
        .clang_args(include_paths.iter().map(|p| format!("-I{}", p.display())))
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
        .prepend_enum_name(false)
        // libcib: connections and the operation table of cib_t
        .allowlist_function("cib_new")
        .allowlist_function("cib_file_new")
        .allowlist_function("cib_delete")
        .allowlist_type("cib_t")
        .allowlist_type("cib_api_operations_t")
        .allowlist_type("cib_call_options")
        .allowlist_type("cib_conn_type")
        .allowlist_type("cib_state")
        .allowlist_type("cib_variant")
        .allowlist_var("T_CIB_DIFF_NOTIFY")
        // libcrmcommon: results, XML
        .allowlist_function("pcmk_strerror")
        .allowlist_function("pcmk_rc_str")
        .allowlist_function("crm_exit_str")
        .allowlist_var("pcmk_ok")
        .allowlist_type("pcmk_rc_e")
        .allowlist_type("crm_exit_e")
        .allowlist_function("crm_xml_init")
        .allowlist_function("string2xml")
        .allowlist_function("dump_xml_unformatted")
        .allowlist_function("dump_xml_formatted")
        .allowlist_function("free_xml")
        .allowlist_function("xml_apply_patchset")
        .allowlist_function("calculate_xml_versioned_digest")
        // libcrmcommon: IPC API, controller and pacemakerd
        .allowlist_function("pcmk_new_ipc_api")
        .allowlist_function("pcmk_free_ipc_api")
        .allowlist_function("pcmk_connect_ipc")
        .allowlist_function("pcmk_disconnect_ipc")
        .allowlist_function("pcmk_poll_ipc")
        .allowlist_function("pcmk_dispatch_ipc")
        .allowlist_function("pcmk_register_ipc_callback")
        .allowlist_function("pcmk_ipc_is_connected")
        .allowlist_function("pcmk_ipc_name")
        .allowlist_function("pcmk_controld_api_.*")
        .allowlist_type("pcmk_controld_api_reply_t")
        .allowlist_function("pcmk_pacemakerd_api_.*")
        .allowlist_type("pcmk_pacemakerd_api_reply_t")
        // libcrmcommon: the attribute manager (clear a resource's fail counts, as crm_resource --cleanup)
        .allowlist_function("pcmk__attrd_api_clear_failures")
        .allowlist_function("pcmk__attrd_api_update")
        // libpacemaker (declared in wrapper.h)
        .allowlist_function("pcmk_designated_controller")
        .allowlist_function("pcmk_controller_status")
        .allowlist_function("pcmk_pacemakerd_status")
        .allowlist_function("pcmk_list_nodes")
        .allowlist_function("pcmk_status")
        // libpacemaker/libpe_status: the scheduler, run on a copy of the CIB (what-if)
        .allowlist_function("pcmk_simulate")
        .allowlist_type("pcmk_injections_t")
        .allowlist_type("pcmk_sim_flags")
        .allowlist_function("pe_new_working_set")
        .allowlist_function("pe_free_working_set")
        .opaque_type("pe_working_set_s")
        .opaque_type("pe_working_set_t")
        // glib: the default main context that libcib's IPC notifications are dispatched from
        .allowlist_function("g_main_context_default")
        .allowlist_function("g_main_context_acquire")
        .allowlist_function("g_main_context_release")
        .allowlist_function("g_main_context_iteration")
        .allowlist_function("g_main_context_wakeup")
        // libxml2: the node hooks and buffer scheme crm_xml_init() installs, which libxml2 keeps per thread
        // for every thread but its "main" one (see vmha-pacemaker's xml module)
        .allowlist_function("xmlRegisterNodeDefault")
        .allowlist_function("xmlDeregisterNodeDefault")
        .allowlist_function("__xmlRegisterNodeDefaultValue")
        .allowlist_function("__xmlDeregisterNodeDefaultValue")
        .allowlist_function("__xmlBufferAllocScheme")
        .allowlist_function("xmlThrDefRegisterNodeDefault")
        .allowlist_function("xmlThrDefDeregisterNodeDefault")
        .allowlist_function("xmlThrDefBufferAllocScheme")
        .allowlist_var("XML_BUFFER_ALLOC_DOUBLEIT")
        .generate()
        .expect("generating the Pacemaker bindings");

    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    bindings
        .write_to_file(out.join("bindings.rs"))
        .expect("writing the Pacemaker bindings");
}
