/* The Pacemaker client API vmha binds (Pacemaker 2.1.5 as Debian 12 ships it). */
#include <crm/crm.h>
#include <crm/cib.h>
#include <crm/common/results.h>
#include <crm/common/xml.h>
#include <crm/common/ipc.h>
#include <crm/common/ipc_controld.h>
#include <crm/common/ipc_pacemakerd.h>
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
