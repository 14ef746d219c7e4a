/* cgroup/getpeername4 and getpeername6 on each enrolled pod's cgroup.
 *
 * After connect4/6 rewrote a connection to the agent's listener, the app
 * would see 127.0.0.1:15001 from getpeername(); some apps log or check it.
 * Answer with the address the app connected to (kernel 5.8+).
 */
#include "lib/maps.h"

int tether_peer4(struct bpf_sock_addr *ctx)
{
	__u64 cookie = tether_cookie64(ctx);
	struct tether_addr *o = tether_orig.lookup(&cookie);

	if (!o || o->family != AF_INET)
		return 1;
	ctx->user_ip4 = o->ip[0];
	ctx->user_port = o->port;
	return 1;
}

#if TETHER_ENABLE_IPV6
int tether_peer6(struct bpf_sock_addr *ctx)
{
	__u64 cookie = tether_cookie64(ctx);
	struct tether_addr *o = tether_orig.lookup(&cookie);

	if (!o)
		return 1;
	if (o->family == AF_INET) {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = bpf_htonl(0x0000ffff);
		ctx->user_ip6[3] = o->ip[0];
	} else {
		ctx->user_ip6[0] = o->ip[0];
		ctx->user_ip6[1] = o->ip[1];
		ctx->user_ip6[2] = o->ip[2];
		ctx->user_ip6[3] = o->ip[3];
	}
	ctx->user_port = o->port;
	return 1;
}
#endif
