/* sk_msg on tether_socks: skip the loopback TCP hop between a pod and the agent.
 *
 * Both ends of a pod<->agent loopback connection sit in tether_socks under
 * their own 4-tuple.  A message sent on one end is queued directly on the
 * other end's receive queue (BPF_F_INGRESS), so it never crosses the TCP
 * stack twice.  A socket whose peer is not in the map (sk_msg switched off,
 * the peer already closed) falls back to the normal path.  Off unless the
 * agent sets TETHER_CFG_SKMSG: sockmap has a history of kernel bugs.
 */
#include "lib/maps.h"

int tether_sk_msg(struct sk_msg_md *msg)
{
	struct tether_tuple peer = {};

	/* The peer's own tuple is ours reversed. */
#if TETHER_ENABLE_IPV6
	if (msg->family == AF_INET6) {
		__u32 l[4] = { msg->local_ip6[0], msg->local_ip6[1],
			       msg->local_ip6[2], msg->local_ip6[3] };
		__u32 r[4] = { msg->remote_ip6[0], msg->remote_ip6[1],
			       msg->remote_ip6[2], msg->remote_ip6[3] };

		tether_addr_set6(&peer.src, r, TETHER_PORT_FROM_NET32(msg->remote_port));
		tether_addr_set6(&peer.dst, l, TETHER_PORT_FROM_HOST(msg->local_port));
	} else
#endif
	{
		tether_addr_set4(&peer.src, msg->remote_ip4, TETHER_PORT_FROM_NET32(msg->remote_port));
		tether_addr_set4(&peer.dst, msg->local_ip4, TETHER_PORT_FROM_HOST(msg->local_port));
	}
	tether_socks.msg_redirect_hash(msg, &peer, BPF_F_INGRESS);
	return SK_PASS;
}
