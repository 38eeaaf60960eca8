/* The Pacemaker client API vmha binds (Pacemaker 2.1.5 as Debian 12 ships it). */
#include <crm/crm.h>
#include <crm/cib.h>
#include <crm/common/results.h>
#include <crm/common/xml.h>
#include <crm/common/ipc.h>
#include <crm/common/ipc_controld.h>
#include <crm/common/ipc_pacemakerd.h>
/* The attribute manager (pacemaker-attrd) client calls crm_resource --cleanup uses (exported by
 * libcrmcommon.so.34; the header is installed by pacemaker-dev). */
#include <crm/common/ipc_attrd_internal.h>
#include <crm/pengine/status.h>
#include <glib.h>
#include <libxml/globals.h>
#include <libxml/tree.h>

/*
 * libpacemaker's high-level API. Debian 12 ships libpacemaker.so.1 without <pacemaker.h>; these are
 * the declarations of Pacemaker 2.1.5's include/pacemaker.h for the functions it exports
 * (`nm -D /usr/lib/x86_64-linux-gnu/libpacemaker.so.1`). Each returns a standard Pacemaker return
 * code (pcmk_rc_str) and stores its result as a <pacemaker-result> XML tree in *xml (free_xml it).
 */
int pcmk_designated_controller(xmlNodePtr *xml, unsigned int message_timeout_ms);
int pcmk_controller_status(xmlNodePtr *xml, char *dest_node, unsigned int message_timeout_ms);
int pcmk_pacemakerd_status(xmlNodePtr *xml, const char *ipc_name, unsigned int message_timeout_ms);
int pcmk_list_nodes(xmlNodePtr *xml, char *node_types);
int pcmk_status(xmlNodePtr *xml);

/*
 * libpacemaker's scheduler simulation (Pacemaker 2.1.5's include/pacemaker.h, which Debian 12 does not
 * ship): the events to inject, and pcmk_simulate, which runs the scheduler on the CIB that cib_new()
 * opens (CIB_file honoured) and can write the transition graph to graph_file.
 */
typedef struct {
    GList *node_up;
    GList *node_down;
    GList *node_fail;
    GList *op_inject;
    GList *op_fail;
    GList *ticket_grant;
    GList *ticket_revoke;
    GList *ticket_standby;
    GList *ticket_activate;
    char *watchdog;
    char *quorum;
} pcmk_injections_t;

enum pcmk_sim_flags {
    pcmk_sim_none             = 0,
    pcmk_sim_all_actions      = 1 << 0,
    pcmk_sim_show_pending     = 1 << 1,
    pcmk_sim_process          = 1 << 2,
    pcmk_sim_show_scores      = 1 << 3,
    pcmk_sim_show_utilization = 1 << 4,
    pcmk_sim_simulate         = 1 << 5,
    pcmk_sim_sanitized        = 1 << 6,
    pcmk_sim_verbose          = 1 << 7,
};

int pcmk_simulate(xmlNodePtr *xml, pe_working_set_t *data_set, pcmk_injections_t *injections,
                  unsigned int flags, unsigned int section_opts, char *use_date, char *input_file,
                  char *graph_file, char *dot_file);
