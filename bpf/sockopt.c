/* cgroup/getsockopt on the agent's cgroup: answer SO_ORIGINAL_DST.
 *
 * Proxies ask getsockopt(SOL_IP, SO_ORIGINAL_DST) (or SOL_IPV6,
 * IP6T_SO_ORIGINAL_DST) for where a redirected connection was going; with no
 * iptables the kernel has no answer, so this program gives the one connect4/6
 * recorded.  The hook applies by the cgroup of the socket (an accepted socket
 * inherits its listener's), so it must sit on the cgroup the agent's
 * listeners are created in.  Any other getsockopt passes through untouched.
 */
#include "lib/maps.h"

#define TETHER_SO_ORIGINAL_DST 80	/* SO_ORIGINAL_DST == IP6T_SO_ORIGINAL_DST */

struct tether_sockaddr_in {
	__u16 family;
	__u16 port;
	__u32 addr;
	__u8 zero[8];
};

struct tether_sockaddr_in6 {
	__u16 family;
	__u16 port;
	__u32 flowinfo;
	__u32 addr[4];
	__u32 scope_id;
};

int tether_sockopt(struct bpf_sockopt *ctx)
{
	struct tether_tuple key = {};
	struct tether_addr *o;
	struct bpf_sock *sk = ctx->sk;
	__u8 *optval = ctx->optval;
	__u8 *end = ctx->optval_end;
	int level = ctx->level;

	if (ctx->optname != TETHER_SO_ORIGINAL_DST || !sk)
		return 1;
	if ((level != SOL_IP && level != SOL_IPV6) || sk->protocol != IPPROTO_TCP)
		return 1;

	/* The accepted socket's peer is the app socket's local end. */
	if (sk->family == AF_INET) {
		tether_addr_set4(&key.src, sk->dst_ip4, TETHER_PORT_LOW16(*(volatile __u32 *)&sk->dst_port));
		tether_addr_set4(&key.dst, sk->src_ip4, TETHER_PORT_FROM_HOST(sk->src_port));
	} else {
#if TETHER_ENABLE_IPV6
		__u32 d[4] = { sk->dst_ip6[0], sk->dst_ip6[1], sk->dst_ip6[2], sk->dst_ip6[3] };
		__u32 s[4] = { sk->src_ip6[0], sk->src_ip6[1], sk->src_ip6[2], sk->src_ip6[3] };

		tether_addr_set6(&key.src, d, TETHER_PORT_LOW16(*(volatile __u32 *)&sk->dst_port));
		tether_addr_set6(&key.dst, s, TETHER_PORT_FROM_HOST(sk->src_port));
#else
		return 1;
#endif
	}
	o = tether_tuple.lookup(&key);
	if (!o) {
		tether_count(TETHER_STAT_ORIG_DST_MISS);
		return 1;
	}

	if (level == SOL_IP) {
		struct tether_sockaddr_in *sin = (void *)optval;

		if (o->family != AF_INET || (void *)(sin + 1) > (void *)end)
			return 1;
		sin->family = AF_INET;
		sin->port = o->port;
		sin->addr = o->ip[0];
		__builtin_memset(sin->zero, 0, sizeof(sin->zero));
		TETHER_STORE(ctx->optlen, (int)sizeof(*sin));
	} else {
		struct tether_sockaddr_in6 *sin6 = (void *)optval;

		if ((void *)(sin6 + 1) > (void *)end)
			return 1;
		sin6->family = AF_INET6;
		sin6->port = o->port;
		sin6->flowinfo = 0;
		if (o->family == AF_INET) {
			sin6->addr[0] = 0;
			sin6->addr[1] = 0;
			sin6->addr[2] = bpf_htonl(0x0000ffff);
			sin6->addr[3] = o->ip[0];
		} else {
			sin6->addr[0] = o->ip[0];
			sin6->addr[1] = o->ip[1];
			sin6->addr[2] = o->ip[2];
			sin6->addr[3] = o->ip[3];
		}
		sin6->scope_id = 0;
		TETHER_STORE(ctx->optlen, (int)sizeof(*sin6));
	}
	TETHER_STORE(ctx->retval, 0);
	tether_count(TETHER_STAT_ORIG_DST_HIT);
	return 1;
}
