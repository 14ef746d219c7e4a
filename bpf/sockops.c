/* sockops programs.
 *
 * tether_sockops, on each enrolled pod's cgroup: when a redirected connection
 * is established, copy its original destination from the socket cookie to the
 * connection's 4-tuple (the agent's accepted socket can name the tuple but
 * not the app socket's cookie), and put the socket in tether_socks for sk_msg.
 * Both entries go away when the socket closes.
 *
 * tether_agent_ops, on the agent's cgroup: with sk_msg on, put the agent's end
 * of every pod<->agent loopback connection in tether_socks the moment it is
 * established, before the pod can send a byte.  (Inserting it later from user
 * space would let early bytes take the TCP path and later ones the sk_msg
 * path, and the receiver reads the sk_msg queue first: reordering.)  Those
 * are the sockets accepted on the outbound listener, and the agent's
 * deliveries to local apps (found in tether_bypass).
 *
 * tether_sockops also inserts, on PASSIVE_ESTABLISHED, an app's accepted
 * socket whose peer is such a delivery, so both ends of that hop are spliced.
 *
 * tether_probe, on the kubelet's cgroup: record each connection the kubelet
 * opens, before its SYN leaves, so sk_lookup lets health probes reach the app
 * directly.  This tells probes apart without the SNAT to 169.254.7.127 that
 * Istio uses and that several CNIs break.
 */
#include "lib/maps.h"

static __always_inline void tether_tuple_of(struct bpf_sock_ops *skops, struct tether_tuple *t)
{
	__u16 lport = TETHER_PORT_FROM_HOST(skops->local_port);
	__u16 rport = TETHER_PORT_FROM_NET32(skops->remote_port);

#if TETHER_ENABLE_IPV6
	if (skops->family == AF_INET6) {
		__u32 l[4] = { skops->local_ip6[0], skops->local_ip6[1],
			       skops->local_ip6[2], skops->local_ip6[3] };
		__u32 r[4] = { skops->remote_ip6[0], skops->remote_ip6[1],
			       skops->remote_ip6[2], skops->remote_ip6[3] };

		tether_addr_set6(&t->src, l, lport);
		tether_addr_set6(&t->dst, r, rport);
		return;
	}
#endif
	tether_addr_set4(&t->src, skops->local_ip4, lport);
	tether_addr_set4(&t->dst, skops->remote_ip4, rport);
}

static __always_inline int tether_skmsg_enabled(void)
{
	__u32 zero = 0;
	struct tether_cfg *cfg = tether_cfg.lookup(&zero);

	return cfg && (cfg->flags & TETHER_CFG_SKMSG);
}

static __always_inline void tether_sock_insert(struct bpf_sock_ops *skops,
					      struct tether_tuple *key)
{
	long err = tether_socks.sock_hash_update(skops, key, BPF_ANY);

	tether_count(err ? TETHER_STAT_SOCKHASH_FAIL : TETHER_STAT_SOCKHASH_ADD);
}

int tether_sockops(struct bpf_sock_ops *skops)
{
	struct tether_tuple key = {};
	struct tether_addr orig;
	struct tether_addr *o;
	__u64 cookie;

	switch (skops->op) {
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
#if TETHER_ENABLE_SKMSG
		if (tether_skmsg_enabled()) {
			struct tether_tuple init = {};

			/* Our tuple is the initiator's reversed. */
			tether_tuple_of(skops, &key);
			init.src = key.dst;
			init.dst = key.src;
			if (tether_bypass.lookup(&init))
				tether_sock_insert(skops, &key);
		}
#endif
		return 1;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		cookie = tether_cookie64(skops);
		o = tether_orig.lookup(&cookie);
		if (!o)
			return 1;
		orig = *o;
		tether_tuple_of(skops, &key);
		tether_tuple.update(&key, &orig);
		bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
#if TETHER_ENABLE_SKMSG
		if (tether_skmsg_enabled())
			tether_sock_insert(skops, &key);
#endif
		return 1;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] != BPF_TCP_CLOSE)
			return 1;
		cookie = tether_cookie64(skops);
		tether_orig.delete(&cookie);
		tether_tuple_of(skops, &key);
		tether_tuple.delete(&key);
		return 1;
	}
	return 1;
}

int tether_agent_ops(struct bpf_sock_ops *skops)
{
#if TETHER_ENABLE_SKMSG
	struct tether_tuple key = {};

	if (!tether_skmsg_enabled())
		return 1;
	switch (skops->op) {
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		/* accepted on the outbound listener: the pod's connect() */
		if (skops->local_port != TETHER_OUTBOUND_PORT)
			return 1;
		tether_tuple_of(skops, &key);
		tether_sock_insert(skops, &key);
		return 1;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		/* a delivery to a local app, registered in tether_bypass */
		tether_tuple_of(skops, &key);
		if (tether_bypass.lookup(&key))
			tether_sock_insert(skops, &key);
		return 1;
	}
#endif
	return 1;
}

int tether_probe(struct bpf_sock_ops *skops)
{
	struct tether_tuple key = {};
	__u8 one = 1;

	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		/* Source port and address are bound by now; the SYN is not sent. */
		tether_tuple_of(skops, &key);
		tether_bypass.update(&key, &one);
		bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
		tether_count(TETHER_STAT_PROBE_MARKED);
		return 1;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] != BPF_TCP_CLOSE)
			return 1;
		tether_tuple_of(skops, &key);
		tether_bypass.delete(&key);
		return 1;
	}
	return 1;
}
