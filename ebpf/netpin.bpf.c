// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0
//
// Ferry's tc programs for the migration NIC (built by `cargo xtask build-ebpf`, loaded by the
// agent with aya, attached with TCX to every monitored interface of the host).
//
// - ferry_egress: counts bytes and packets per interface and class (migration = packets whose
//   skb->mark is Ferry's mark, set with SO_MARK on every migration socket, or whose IPv4 source
//   is the host's migration address). A marked packet that
//   is about to leave through another NIC is redirected to the migration NIC with
//   bpf_redirect_neigh (pinning), or counted as a leak when that is off or impossible. With
//   "dedicated", unmarked IPv4 traffic is kept off the migration NIC (dropped and counted).
// - ferry_ingress: counts received bytes and packets per interface and class (migration =
//   IPv4 packets addressed to this host's migration address).
//
// Only UAPI headers are used (no vmlinux.h, no CO-RE): the __sk_buff fields read here are
// stable ABI.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>

#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int (*name)[val]
#define __type(name, val) typeof(val) *name

static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)BPF_FUNC_map_lookup_elem;
static long (*bpf_skb_load_bytes)(const void *skb, __u32 offset, void *to, __u32 len) =
	(void *)BPF_FUNC_skb_load_bytes;
static long (*bpf_redirect_neigh)(__u32 ifindex, struct bpf_redir_neigh *params, int plen,
				  __u64 flags) = (void *)BPF_FUNC_redirect_neigh;

#define FLAG_PIN 1
#define FLAG_DEDICATED 2

struct config {
	__u32 migration_ifindex;
	__u32 mark;
	__u32 migration_addr; /* network byte order */
	__u32 flags;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
} FERRY_CONFIG SEC(".maps");

#define DIR_INGRESS 0
#define DIR_EGRESS 1
#define CLASS_OTHER 0
#define CLASS_MIGRATION 1

struct counter_key {
	__u32 ifindex;
	__u8 dir;
	__u8 class;
	__u16 pad;
};

struct counter {
	__u64 bytes;
	__u64 packets;
};

/* Keys are created by the agent for every monitored interface; the programs only add. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 1024);
	__type(key, struct counter_key);
	__type(value, struct counter);
} FERRY_COUNTERS SEC(".maps");

#define EV_REDIRECTED 0
#define EV_LEAKED 1
#define EV_DEDICATED_DROP 2
#define EV_COUNT 3

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, EV_COUNT);
	__type(key, __u32);
	__type(value, struct counter);
} FERRY_EVENTS SEC(".maps");

static __always_inline void count(__u32 ifindex, __u8 dir, __u8 class, __u32 len)
{
	struct counter_key k = { .ifindex = ifindex, .dir = dir, .class = class, .pad = 0 };
	struct counter *c = bpf_map_lookup_elem(&FERRY_COUNTERS, &k);
	if (c) {
		c->bytes += len;
		c->packets += 1;
	}
}

static __always_inline void event(__u32 ev, __u32 len)
{
	struct counter *c = bpf_map_lookup_elem(&FERRY_EVENTS, &ev);
	if (c) {
		c->bytes += len;
		c->packets += 1;
	}
}

SEC("classifier")
int ferry_egress(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct config *cfg = bpf_map_lookup_elem(&FERRY_CONFIG, &zero);
	if (!cfg)
		return TC_ACT_OK;
	__u32 ifindex = skb->ifindex;
	int marked = cfg->mark != 0 && skb->mark == cfg->mark;
	/* Traffic from the migration address is migration traffic too, marked or not (the
	 * kernel's own replies, e.g. ICMP echo replies to `ferry ping`, carry no mark). */
	if (!marked && cfg->migration_addr != 0 && skb->protocol == __constant_htons(ETH_P_IP)) {
		__u32 saddr = 0;
		if (bpf_skb_load_bytes(skb, ETH_HLEN + __builtin_offsetof(struct iphdr, saddr),
				       &saddr, sizeof(saddr)) == 0 &&
		    saddr == cfg->migration_addr)
			marked = 1;
	}
	if (marked && ifindex != cfg->migration_ifindex) {
		if ((cfg->flags & FLAG_PIN) && cfg->migration_ifindex != 0) {
			event(EV_REDIRECTED, skb->len);
			/* The migration NIC's own egress hook counts it as it leaves. */
			return bpf_redirect_neigh(cfg->migration_ifindex, 0, 0, 0);
		}
		event(EV_LEAKED, skb->len);
		if (cfg->flags & FLAG_PIN)
			return TC_ACT_SHOT;
	}
	if (!marked && ifindex == cfg->migration_ifindex && (cfg->flags & FLAG_DEDICATED) &&
	    skb->protocol == __constant_htons(ETH_P_IP)) {
		event(EV_DEDICATED_DROP, skb->len);
		return TC_ACT_SHOT;
	}
	count(ifindex, DIR_EGRESS, marked ? CLASS_MIGRATION : CLASS_OTHER, skb->len);
	return TC_ACT_OK;
}

SEC("classifier")
int ferry_ingress(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct config *cfg = bpf_map_lookup_elem(&FERRY_CONFIG, &zero);
	if (!cfg)
		return TC_ACT_OK;
	__u8 class = CLASS_OTHER;
	if (skb->protocol == __constant_htons(ETH_P_IP) && cfg->migration_addr != 0) {
		__u32 daddr = 0;
		if (bpf_skb_load_bytes(skb, ETH_HLEN + __builtin_offsetof(struct iphdr, daddr),
				       &daddr, sizeof(daddr)) == 0 &&
		    daddr == cfg->migration_addr)
			class = CLASS_MIGRATION;
	}
	count(skb->ifindex, DIR_INGRESS, class, skb->len);
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "Dual Apache-2.0/GPL";
