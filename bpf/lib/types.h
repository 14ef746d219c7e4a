/* Structs shared between the BPF programs and the agent.
 *
 * Every struct here is mirrored in agent/datapath/structs.py, and the bpf test
 * tier compiles this header and compares sizes and offsets with the mirror:
 * change both together.  Keep members naturally aligned with no implicit
 * padding, so a key built with `= {}` in C and bytes() in Python hash alike.
 */
#ifndef TETHER_TYPES_H
#define TETHER_TYPES_H

/* One TCP endpoint.  Addresses and port are in network byte order; IPv4 is in
 * ip[0] with ip[1..3] zero; IPv4-mapped IPv6 addresses are stored as IPv4, so
 * a dual-stack socket and an AF_INET socket produce the same key. */
struct tether_addr {
	__u32 ip[4];
	__u16 port;
	__u16 family;		/* AF_INET or AF_INET6 */
};

/* A connection as its initiator sees it: src is the connecting socket's local
 * address, dst the address it connected to. */
struct tether_tuple {
	struct tether_addr src;
	struct tether_addr dst;
};

/* An enrolled pod.  slot indexes the pod's listener sockets in tether_listen
 * and scopes its exclusions in tether_ports / tether_nets. */
struct tether_pod {
	__u32 slot;
	__u32 flags;		/* TETHER_POD_* */
};

#define TETHER_POD_OUTBOUND	(1U << 0)	/* capture connect() */
#define TETHER_POD_INBOUND	(1U << 1)	/* steer inbound SYNs (sk_lookup) */

/* Key of tether_podips: one address of an enrolled pod. */
struct tether_ipkey {
	__u32 family;
	__u32 ip[4];
};

/* Key of tether_nets (LPM trie): a destination CIDR a pod does not capture.
 * prefixlen counts the 64 bits of slot and family before the address. */
struct tether_netkey {
	__u32 prefixlen;
	__u32 slot;
	__u32 family;
	__u32 ip[4];
};

/* Key of tether_ports: a port a pod does not capture, per direction. */
struct tether_portkey {
	__u32 slot;
	__u16 port;		/* host byte order */
	__u16 dir;		/* TETHER_DIR_* */
};

#define TETHER_DIR_OUT	1
#define TETHER_DIR_IN	2

/* Index into tether_listen: each pod slot has four listener sockets. */
#define TETHER_LISTEN_PER_POD	4
#define TETHER_LISTEN_PLAIN4	0	/* inbound plaintext, 15006, IPv4 */
#define TETHER_LISTEN_PLAIN6	1	/* inbound plaintext, 15006, IPv6 */
#define TETHER_LISTEN_HBONE4	2	/* inbound HBONE, 15008, IPv4 */
#define TETHER_LISTEN_HBONE6	3	/* inbound HBONE, 15008, IPv6 */

/* tether_cfg[0].flags */
#define TETHER_CFG_SKMSG	(1U << 0)	/* put redirected sockets in tether_socks */

struct tether_cfg {
	__u32 flags;
	__u32 reserved;
};

/* Counters in tether_stats (per CPU); the agent exports them as metrics. */
enum tether_stat {
	TETHER_STAT_OUT_CAPTURED = 0,	/* connect() redirected to the outbound listener */
	TETHER_STAT_OUT_SKIPPED,	/* enrolled, destination excluded (loopback, port, CIDR) */
	TETHER_STAT_IN_CAPTURED,	/* inbound SYN steered to an agent listener */
	TETHER_STAT_IN_SKIPPED,		/* inbound to an excluded port */
	TETHER_STAT_IN_BYPASS,		/* inbound from a kubelet probe or the agent itself */
	TETHER_STAT_IN_NO_LISTENER,	/* enrolled but no agent listener: refused */
	TETHER_STAT_ORIG_DST_HIT,	/* SO_ORIGINAL_DST answered */
	TETHER_STAT_ORIG_DST_MISS,	/* SO_ORIGINAL_DST asked for an unknown connection */
	TETHER_STAT_SOCKHASH_ADD,	/* socket put in tether_socks */
	TETHER_STAT_SOCKHASH_FAIL,	/* sock_hash_update failed */
	TETHER_STAT_PROBE_MARKED,	/* kubelet connection recorded for bypass */
	TETHER_STAT_MAX,
};

#endif
