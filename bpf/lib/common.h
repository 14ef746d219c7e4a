/* Includes, build-time configuration and small helpers for every program. */
#ifndef TETHER_COMMON_H
#define TETHER_COMMON_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include <uapi/linux/in6.h>
#include <linux/socket.h>

/* Build-time configuration arrives as -D cflags from the agent
 * (agent/datapath/loader.py); these are the defaults. */
#ifndef TETHER_OUTBOUND_PORT
#define TETHER_OUTBOUND_PORT 15001
#endif
#ifndef TETHER_INBOUND_PORT
#define TETHER_INBOUND_PORT 15006
#endif
#ifndef TETHER_HBONE_PORT
#define TETHER_HBONE_PORT 15008
#endif
#ifndef TETHER_MAX_PODS
#define TETHER_MAX_PODS 1024
#endif
#ifndef TETHER_MAX_CONNS
#define TETHER_MAX_CONNS 65536
#endif
#ifndef TETHER_PIN_DIR
#define TETHER_PIN_DIR "/sys/fs/bpf/tether"
#endif
#ifndef TETHER_ENABLE_IPV6
#define TETHER_ENABLE_IPV6 1
#endif
#ifndef TETHER_ENABLE_SKMSG
#define TETHER_ENABLE_SKMSG 1
#endif
#ifndef TETHER_DEBUG
#define TETHER_DEBUG 0
#endif

#include "types.h"

#if TETHER_DEBUG
#define tether_dbg(fmt, ...) bpf_trace_printk(fmt, ##__VA_ARGS__)
#else
#define tether_dbg(fmt, ...) do { } while (0)
#endif

/* BCC declares bpf_get_socket_cookie() as returning u32; the kernel returns
 * a 64-bit cookie and truncating it would make unrelated sockets collide. */
static __u64 (*tether_cookie64)(void *ctx) = (void *)BPF_FUNC_get_socket_cookie;

/* Stores into context fields go through a volatile pointer: clang otherwise
 * merges adjacent 4-byte stores (optlen + retval in bpf_sockopt) into one
 * 8-byte store that the verifier rejects as an invalid context access. */
#define TETHER_STORE(field, val) (*(volatile __typeof__(field) *)&(field) = (val))

/* Ports arrive in three encodings depending on the context; normalise to a
 * network-order u16.  sock_ops and sk_msg expose remote_port as a 32-bit
 * network-order value (port << 16 on little endian); bpf_sock and
 * bpf_sk_lookup keep the network-order u16 in the low half, read as u32 so
 * the load is valid on 5.10 (before the field became __be16). */
#define TETHER_PORT_FROM_NET32(v)	((__u16)bpf_htons((__u16)bpf_ntohl(v)))
#define TETHER_PORT_FROM_HOST(v)	((__u16)bpf_htons((__u16)(v)))
#define TETHER_PORT_LOW16(v)		((__u16)(v))

static __always_inline int tether_is_v4mapped(const __u32 ip[4])
{
	return ip[0] == 0 && ip[1] == 0 && ip[2] == bpf_htonl(0x0000ffff);
}

static __always_inline int tether_is_loopback4(__u32 ip)
{
	return (bpf_ntohl(ip) >> 24) == 127;
}

static __always_inline int tether_is_loopback6(const __u32 ip[4])
{
	return ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == bpf_htonl(1);
}

/* fe80::/10: scoped to a link, never meaningful to a node-wide tunnel. */
static __always_inline int tether_is_linklocal6(const __u32 ip[4])
{
	return (bpf_ntohl(ip[0]) & 0xffc00000) == 0xfe800000;
}

/* Fill an endpoint from an address (network order) that may be IPv4-mapped. */
static __always_inline void tether_addr_set6(struct tether_addr *a, const __u32 ip[4], __u16 port)
{
	a->port = port;
	if (tether_is_v4mapped(ip)) {
		a->family = AF_INET;
		a->ip[0] = ip[3];
		return;
	}
	a->family = AF_INET6;
	a->ip[0] = ip[0];
	a->ip[1] = ip[1];
	a->ip[2] = ip[2];
	a->ip[3] = ip[3];
}

static __always_inline void tether_addr_set4(struct tether_addr *a, __u32 ip, __u16 port)
{
	a->family = AF_INET;
	a->ip[0] = ip;
	a->port = port;
}

#endif
