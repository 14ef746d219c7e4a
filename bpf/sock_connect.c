/* cgroup/connect4 and cgroup/connect6 on each enrolled pod's cgroup.
 *
 * A TCP connect() from the pod is sent to the agent's outbound listener inside
 * the pod's own network namespace (127.0.0.1 / [::1] : TETHER_OUTBOUND_PORT),
 * and the address the app asked for is remembered under the socket cookie.
 * These hooks run before any node-level socket load balancer attached higher
 * in the cgroup tree, so a Service VIP reaches the agent untranslated and the
 * agent, not the CNI, picks the endpoint.  The agent's own sockets live in
 * the agent's cgroup, so its upstream connections are never captured.
 */
#include "lib/maps.h"

static __always_inline struct tether_pod *tether_pod_of(void *ctx)
{
	/* Keyed by netns cookie rather than trusting the cgroup alone: a
	 * process that joins the pod's cgroup from another network namespace
	 * (nsenter, a debug container) must not be redirected into a netns
	 * whose loopback it cannot reach. */
	__u64 ns = bpf_get_netns_cookie(ctx);
	struct tether_pod *pod = tether_pods.lookup(&ns);

	if (!pod || !(pod->flags & TETHER_POD_OUTBOUND))
		return NULL;
	return pod;
}

/* Record the original destination, or return 0 if it must not be captured. */
static __always_inline int tether_remember(struct bpf_sock_addr *ctx, struct tether_pod *pod,
					   struct tether_addr *orig)
{
	__u64 cookie;

	if (orig->port == 0 ||
	    tether_port_excluded(pod->slot, bpf_ntohs(orig->port), TETHER_DIR_OUT) ||
	    tether_net_excluded(pod->slot, orig)) {
		tether_count(TETHER_STAT_OUT_SKIPPED);
		return 0;
	}
	cookie = tether_cookie64(ctx);
	if (tether_orig.update(&cookie, orig))
		return 0;	/* no room to remember it: leave the connect untouched */
	tether_count(TETHER_STAT_OUT_CAPTURED);
	return 1;
}

int tether_connect4(struct bpf_sock_addr *ctx)
{
	struct tether_addr orig = {};
	struct tether_pod *pod;

	if (ctx->protocol != IPPROTO_TCP)
		return 1;
	pod = tether_pod_of(ctx);
	if (!pod)
		return 1;
	tether_addr_set4(&orig, ctx->user_ip4, TETHER_PORT_LOW16(ctx->user_port));
	if (tether_is_loopback4(orig.ip[0])) {
		tether_count(TETHER_STAT_OUT_SKIPPED);
		return 1;
	}
	if (!tether_remember(ctx, pod, &orig))
		return 1;
	ctx->user_ip4 = bpf_htonl(0x7f000001);
	ctx->user_port = bpf_htons(TETHER_OUTBOUND_PORT);
	return 1;
}

#if TETHER_ENABLE_IPV6
int tether_connect6(struct bpf_sock_addr *ctx)
{
	struct tether_addr orig = {};
	struct tether_pod *pod;
	__u32 ip[4];

	if (ctx->protocol != IPPROTO_TCP)
		return 1;
	pod = tether_pod_of(ctx);
	if (!pod)
		return 1;
	ip[0] = ctx->user_ip6[0];
	ip[1] = ctx->user_ip6[1];
	ip[2] = ctx->user_ip6[2];
	ip[3] = ctx->user_ip6[3];
	tether_addr_set6(&orig, ip, TETHER_PORT_LOW16(ctx->user_port));
	if (orig.family == AF_INET ? tether_is_loopback4(orig.ip[0])
				   : tether_is_loopback6(ip) || tether_is_linklocal6(ip)) {
		tether_count(TETHER_STAT_OUT_SKIPPED);
		return 1;
	}
	if (!tether_remember(ctx, pod, &orig))
		return 1;
	if (orig.family == AF_INET) {
		/* Dual-stack socket to an IPv4-mapped address: keep it mapped so
		 * it lands on the IPv4 listener. */
		ctx->user_ip6[2] = bpf_htonl(0x0000ffff);
		ctx->user_ip6[3] = bpf_htonl(0x7f000001);
	} else {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = 0;
		ctx->user_ip6[3] = bpf_htonl(1);
	}
	ctx->user_port = bpf_htons(TETHER_OUTBOUND_PORT);
	return 1;
}
#endif

/* cgroup/connect4 on the agent's cgroup: report the netns cookie of a UDP
 * socket the agent connects to TETHER_NSPROBE_PORT on loopback (no packet is
 * sent: a UDP connect only sets the peer).  Kernels before 5.14 cannot say
 * a netns cookie to user space any other way; 5.14+ use SO_NETNS_COOKIE. */
#ifndef TETHER_NSPROBE_PORT
#define TETHER_NSPROBE_PORT 9
#endif
int tether_nsprobe(struct bpf_sock_addr *ctx)
{
	__u64 cookie, ns;

	if (ctx->protocol != IPPROTO_UDP || !tether_is_loopback4(ctx->user_ip4) ||
	    TETHER_PORT_LOW16(ctx->user_port) != bpf_htons(TETHER_NSPROBE_PORT))
		return 1;
	cookie = tether_cookie64(ctx);
	ns = bpf_get_netns_cookie(ctx);
	tether_nscookie.update(&cookie, &ns);
	return 1;
}
