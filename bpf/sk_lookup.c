/* sk_lookup on each enrolled pod's network namespace: inbound capture.
 *
 * A TCP SYN to an enrolled pod's address is handed to the agent's listener in
 * that namespace: port TETHER_HBONE_PORT to the HBONE listener, any other
 * port to the plaintext listener.  The accepted socket keeps the address the
 * peer dialled as its local address, so getsockname() is the inbound
 * original destination.  No iptables, no routing tricks, and the pod's
 * own listening sockets are left exactly as the app made them.
 *
 * Not steered: addresses that are not an enrolled pod's (loopback among
 * them), excluded ports, and connections recorded in tether_bypass (kubelet
 * health probes, and the agent delivering to the app after authorising).
 * An enrolled pod whose agent listener is missing (agent down) refuses the
 * connection rather than letting it reach the app unauthorised.
 */
#include "lib/maps.h"

int tether_lookup(struct bpf_sk_lookup *ctx)
{
	struct tether_ipkey k = {};
	struct tether_tuple t = {};
	struct tether_pod *pod;
	struct bpf_sock *sk;
	__u16 lport = ctx->local_port;
	__u16 rport = TETHER_PORT_LOW16(*(volatile __u32 *)&ctx->remote_port);
	__u32 idx;
	long err;

	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	if (ctx->family == AF_INET) {
		k.family = AF_INET;
		k.ip[0] = ctx->local_ip4;
		tether_addr_set4(&t.src, ctx->remote_ip4, rport);
		tether_addr_set4(&t.dst, ctx->local_ip4, bpf_htons(lport));
	} else {
#if TETHER_ENABLE_IPV6
		__u32 l[4] = { ctx->local_ip6[0], ctx->local_ip6[1],
			       ctx->local_ip6[2], ctx->local_ip6[3] };
		__u32 r[4] = { ctx->remote_ip6[0], ctx->remote_ip6[1],
			       ctx->remote_ip6[2], ctx->remote_ip6[3] };

		k.family = AF_INET6;
		k.ip[0] = l[0];
		k.ip[1] = l[1];
		k.ip[2] = l[2];
		k.ip[3] = l[3];
		tether_addr_set6(&t.src, r, rport);
		tether_addr_set6(&t.dst, l, bpf_htons(lport));
#else
		return SK_PASS;
#endif
	}
	pod = tether_podips.lookup(&k);
	if (!pod || !(pod->flags & TETHER_POD_INBOUND))
		return SK_PASS;
	if (tether_bypass.lookup(&t)) {
		tether_count(TETHER_STAT_IN_BYPASS);
		return SK_PASS;
	}
	if (lport == TETHER_HBONE_PORT)
		idx = TETHER_LISTEN_HBONE4;
	else if (tether_port_excluded(pod->slot, lport, TETHER_DIR_IN)) {
		tether_count(TETHER_STAT_IN_SKIPPED);
		return SK_PASS;
	} else
		idx = TETHER_LISTEN_PLAIN4;
	if (ctx->family == AF_INET6)
		idx += 1;
	idx += pod->slot * TETHER_LISTEN_PER_POD;

	sk = (struct bpf_sock *)tether_listen.lookup(&idx);
	if (!sk) {
		tether_count(TETHER_STAT_IN_NO_LISTENER);
		return SK_DROP;
	}
	err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	if (err) {
		tether_count(TETHER_STAT_IN_NO_LISTENER);
		return SK_DROP;
	}
	tether_count(TETHER_STAT_IN_CAPTURED);
	return SK_PASS;
}
