/* The Corosync client library headers vmha binds (Debian: libcpg-dev libquorum-dev libvotequorum-dev
 * libcmap-dev libcfg-dev libcorosync-common-dev). */
#include <corosync/corotypes.h>
#include <corosync/cpg.h>
#include <corosync/quorum.h>
#include <corosync/votequorum.h>
#include <corosync/cmap.h>
#include <corosync/cfg.h>
