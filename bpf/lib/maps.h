/* Every map tether uses, declared once.  Each comment says who writes the map
 * and who reads it.  Maps holding state that must outlive an agent restart are
 * pinned under TETHER_PIN_DIR and adopted by the next agent (BPF_TABLE_PINNED
 * reuses an existing pin and creates it otherwise).  The socket maps are not
 * pinned: they hold the agent's own sockets, which die with the agent, and
 * the next agent fills new ones.  Names stay within 15 characters
 * (BPF_OBJ_NAME_LEN) so kernel listings show them whole. */
#ifndef TETHER_MAPS_H
#define TETHER_MAPS_H

#include "common.h"

#define TETHER_PIN(name) TETHER_PIN_DIR "/" name

/* netns cookie -> enrolled pod.
 * Writer: agent (enroll/unenroll).  Readers: connect4/6. */
BPF_TABLE_PINNED("hash", __u64, struct tether_pod, tether_pods,
		 TETHER_MAX_PODS, TETHER_PIN("tether_pods"));

/* pod address -> enrolled pod.
 * Writer: agent.  Reader: sk_lookup (inbound steering by destination address:
 * pod addresses are unique on a node, and the program needs no netns id). */
BPF_TABLE_PINNED("hash", struct tether_ipkey, struct tether_pod, tether_podips,
		 TETHER_MAX_PODS * 4, TETHER_PIN("tether_podips"));

/* socket cookie -> original destination of a redirected connect().
 * Writer: connect4/6.  Readers: sockops (copies it to tether_tuple),
 * getpeername4/6.  Deleted by sockops when the socket closes; LRU bounds the
 * entries of connects that never complete. */
BPF_TABLE_PINNED("lru_hash", __u64, struct tether_addr, tether_orig,
		 TETHER_MAX_CONNS, TETHER_PIN("tether_orig"));

/* app-side 4-tuple -> original destination.
 * Writer: sockops on ESTABLISHED (socket cookies cannot be read from the
 * listener's side of the connection).  Reader: getsockopt SO_ORIGINAL_DST. */
BPF_TABLE_PINNED("lru_hash", struct tether_tuple, struct tether_addr, tether_tuple,
		 TETHER_MAX_CONNS, TETHER_PIN("tether_tuple"));

/* initiator 4-tuple -> 1: inbound connections sk_lookup must not steer.
 * Writers: probe sockops on the kubelet's cgroup (health probes, recognised
 * at connect time, no SNAT needed) and the agent (its own deliveries to the
 * local app).  Reader: sk_lookup. */
BPF_TABLE_PINNED("lru_hash", struct tether_tuple, __u8, tether_bypass,
		 TETHER_MAX_CONNS, TETHER_PIN("tether_bypass"));

/* (pod slot, port, direction) -> 1: ports a pod does not capture.
 * Writer: agent.  Readers: connect4/6 (OUT), sk_lookup (IN). */
BPF_TABLE_PINNED("hash", struct tether_portkey, __u8, tether_ports,
		 TETHER_MAX_PODS * 16, TETHER_PIN("tether_ports"));

/* (pod slot, CIDR) -> 1: destination networks a pod does not capture.
 * Writer: agent.  Readers: connect4/6. */
BPF_TABLE_PINNED("lpm_trie", struct tether_netkey, __u8, tether_nets,
		 TETHER_MAX_PODS * 16, TETHER_PIN("tether_nets"), BPF_F_NO_PREALLOC);

/* [0] -> runtime switches (TETHER_CFG_*).
 * Writer: agent.  Reader: sockops. */
BPF_TABLE_PINNED("array", __u32, struct tether_cfg, tether_cfg, 1, TETHER_PIN("tether_cfg"));

/* enum tether_stat -> count, per CPU.
 * Writers: every program.  Reader: agent (metrics, tether status). */
BPF_TABLE_PINNED("percpu_array", __u32, __u64, tether_stats, TETHER_STAT_MAX,
		 TETHER_PIN("tether_stats"));

/* socket cookie -> netns cookie of a probe socket the agent connect()s.
 * Writer: tether_nsprobe.  Reader: agent.  Kernels before 5.14 have no
 * SO_NETNS_COOKIE getsockopt; this is how the agent learns a pod's netns
 * cookie there. */
BPF_TABLE("lru_hash", __u64, __u64, tether_nscookie, 256);

/* pod slot * 4 + TETHER_LISTEN_* -> the agent's listening socket in that pod.
 * Writer: agent.  Reader: sk_lookup (bpf_sk_assign). */
/* Declared as a generic table, not BPF_SOCKMAP: BCC gives BPF_SOCKMAP no
 * lookup(), and sk_lookup needs the socket itself for bpf_sk_assign(). */
BPF_TABLE("sockmap", __u32, int, tether_listen, TETHER_MAX_PODS * TETHER_LISTEN_PER_POD);

/* own 4-tuple -> connected socket: both ends of every loopback hop between a
 * pod and the agent.  Writers: sockops (pod side), agent (its side).
 * Reader: sk_msg, which hands bytes straight to the peer's receive queue. */
BPF_SOCKHASH(tether_socks, struct tether_tuple, TETHER_MAX_CONNS);

static __always_inline void tether_count(__u32 stat)
{
	__u64 *c = tether_stats.lookup(&stat);

	if (c)
		*c += 1;
}

/* Is (port, direction) or the destination network excluded for this pod? */
static __always_inline int tether_port_excluded(__u32 slot, __u16 port_host, __u16 dir)
{
	struct tether_portkey k = {};

	k.slot = slot;
	k.port = port_host;
	k.dir = dir;
	return tether_ports.lookup(&k) != NULL;
}

static __always_inline int tether_net_excluded(__u32 slot, const struct tether_addr *dst)
{
	struct tether_netkey k = {};

	k.prefixlen = 64 + (dst->family == AF_INET ? 32 : 128);
	k.slot = slot;
	k.family = dst->family;
	k.ip[0] = dst->ip[0];
	k.ip[1] = dst->ip[1];
	k.ip[2] = dst->ip[2];
	k.ip[3] = dst->ip[3];
	return tether_nets.lookup(&k) != NULL;
}

#endif
