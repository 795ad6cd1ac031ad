//! The state of one address family's SNAT: flows, endpoint-independent mappings, the port pools, the
//! fragment memory and the expiry wheel.
//!
//! Layout is chosen for the hot path and for memory: flows live in a slab addressed by `u32`, and the hash
//! index over them stores only that `u32` (hashbrown's `HashTable`), so a flow costs its slab slot plus a
//! few bytes of index. Looking up an established flow is one hash, one probe and one slab read.

use core::hash::{BuildHasher, Hasher};
use std::collections::{HashMap, VecDeque};

use hashbrown::HashTable;

use super::addr::Family;
use super::{DropReason, Timeouts};

pub(super) const NONE: u32 = u32::MAX;

/// The protocols that get their own port space: TCP ports, UDP ports and ICMP echo identifiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub(super) enum Proto {
    Tcp = 0,
    Udp = 1,
    Icmp = 2,
}

/// TCP progress, as bits in [`Flow::tcp`]. Only what decides the idle timeout is tracked (RFC 5382 §5).
pub(super) mod tcp {
    pub const SYN_OUT: u8 = 1;
    pub const REPLIED: u8 = 2;
    pub const FIN_OUT: u8 = 4;
    pub const FIN_IN: u8 = 8;
    pub const RST: u8 = 16;
}

/// A session: one internal endpoint talking to one remote endpoint through a mapping.
#[derive(Debug, Clone, Copy)]
pub(super) struct Flow<A> {
    pub int_addr: A,
    pub remote_addr: A,
    pub int_port: u16,
    pub remote_port: u16,
    /// The mapping's external port, copied so the hot path need not read the mapping (it fits in what
    /// would otherwise be padding).
    pub ext_port: u16,
    /// Index of the mapping; [`NONE`] marks a free slab slot.
    pub mapping: u32,
    /// Tick at which the flow expires unless refreshed.
    pub expires: u32,
    /// Tick of the expiry-wheel entry that will look at this flow next (see [`Wheel`]).
    pub next_check: u32,
    pub proto: Proto,
    pub tcp: u8,
}

/// An endpoint-independent mapping (RFC 4787 REQ-1, RFC 5382 REQ-1): one internal address and port bound
/// to one external port, shared by every flow from that endpoint whatever its destination.
#[derive(Debug, Clone, Copy)]
pub(super) struct Mapping<A> {
    pub int_addr: A,
    pub int_port: u16,
    pub ext_port: u16,
    pub proto: Proto,
    /// Flows using the mapping; zero marks a free slab slot.
    pub flows: u32,
}

/// Identifies a flow from the internal side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FlowKey<A> {
    pub proto: Proto,
    pub int_addr: A,
    pub int_port: u16,
    pub remote_addr: A,
    pub remote_port: u16,
}

impl<A: Family> Flow<A> {
    fn key(&self) -> FlowKey<A> {
        FlowKey {
            proto: self.proto,
            int_addr: self.int_addr,
            int_port: self.int_port,
            remote_addr: self.remote_addr,
            remote_port: self.remote_port,
        }
    }

    #[inline]
    fn matches(&self, k: &FlowKey<A>) -> bool {
        self.int_port == k.int_port
            && self.remote_port == k.remote_port
            && self.proto == k.proto
            && self.int_addr == k.int_addr
            && self.remote_addr == k.remote_addr
    }

    pub fn timeout(&self, t: &Timeouts) -> u32 {
        match self.proto {
            Proto::Udp => t.udp,
            Proto::Icmp => t.icmp,
            Proto::Tcp => {
                let closing = self.tcp & (tcp::FIN_OUT | tcp::FIN_IN | tcp::RST) != 0;
                if closing || self.tcp & tcp::REPLIED == 0 { t.tcp_transitory } else { t.tcp_established }
            }
        }
    }
}

/// External ports of one protocol: who owns each, and which are free in least-recently-used order, so a
/// port just released is not handed to a new flow while the remote may still hold TIME_WAIT state for it.
#[derive(Debug)]
struct PortPool {
    first: u16,
    owner: Vec<u32>,
    free: VecDeque<u16>,
}

impl PortPool {
    fn new(first: u16, last: u16, rng: &mut fastrand::Rng) -> Self {
        let mut ports: Vec<u16> = (first..=last).collect();
        // A random starting order makes external ports unpredictable to off-path attackers (RFC 6056).
        rng.shuffle(&mut ports);
        Self { first, owner: vec![NONE; ports.len()], free: ports.into() }
    }

    #[inline]
    fn owner(&self, port: u16) -> Option<u32> {
        let slot = usize::from(port.checked_sub(self.first)?);
        self.owner.get(slot).copied().filter(|&m| m != NONE)
    }
}

/// A slab of `T` with a free list; indices stay stable so the hash index and the wheel can refer to them.
/// It grows by an eighth rather than by doubling, so a table of N flows carries at most N/8 unused slots
/// (doubling would allow N) while lookups stay a single indexed load. Large reallocations are cheap: the
/// allocator remaps pages instead of copying.
#[derive(Debug)]
struct Slab<T> {
    items: Vec<T>,
    free: Vec<u32>,
}

const MIN_GROWTH: usize = 1024;

impl<T> Slab<T> {
    fn new() -> Self {
        Self { items: Vec::new(), free: Vec::new() }
    }

    fn insert(&mut self, item: T) -> u32 {
        if let Some(i) = self.free.pop() {
            self[i] = item;
            return i;
        }
        if self.items.len() == self.items.capacity() {
            self.items.reserve_exact((self.items.len() / 8).max(MIN_GROWTH));
        }
        self.items.push(item);
        (self.items.len() - 1) as u32
    }

    /// Slots ever used, free or not.
    fn slots(&self) -> usize {
        self.items.len()
    }
}

impl<T> core::ops::Index<u32> for Slab<T> {
    type Output = T;

    #[inline]
    fn index(&self, i: u32) -> &T {
        &self.items[i as usize]
    }
}

impl<T> core::ops::IndexMut<u32> for Slab<T> {
    #[inline]
    fn index_mut(&mut self, i: u32) -> &mut T {
        &mut self.items[i as usize]
    }
}

/// Expiry without sweeping: a wheel of one-second slots holding flow indices. Refreshing a flow only moves
/// its `expires` forward; when its slot comes round the flow is either expired or re-filed at its new time.
/// A flow whose timeout shrinks (FIN, RST) is filed again at the earlier time and `next_check` says which
/// entry is current, so stale entries are recognised and dropped.
///
/// Every entry is filed within one lap of the last processed tick, so the entries of a slot are all due
/// when it comes round: a timeout longer than the wheel is reached in several hops, never by keeping
/// not-yet-due entries that a bounded pass would have to step over again and again.
#[derive(Debug)]
struct Wheel {
    slots: Box<[Vec<u32>]>,
    /// Every tick up to and including this one has been processed.
    done: u32,
}

const WHEEL_SLOTS: u32 = 8192;

impl Wheel {
    /// The tick to file an entry due at `due` under, given that ticks up to `done` are processed.
    #[inline]
    fn target(&self, due: u32, done: u32) -> u32 {
        due.clamp(done + 1, done + WHEEL_SLOTS - 1)
    }

    #[inline]
    fn file(&mut self, flow: u32, at: u32) {
        self.slots[(at % WHEEL_SLOTS) as usize].push(flow);
    }
}

/// Identifies a fragmented datagram as reassembly does: (source, destination, protocol, identification)
/// for IPv4, (source, destination, identification) for IPv6 (RFC 8200 §4.5), where `proto` is zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct FragmentKey<A> {
    pub src: A,
    pub dst: A,
    pub proto: u8,
    pub id: u32,
    pub inbound: bool,
}

/// What the first fragment of a datagram was translated to, so later fragments (which carry no ports) can
/// follow it. Every entry lives for the same time, so insertion order is expiry order.
#[derive(Debug)]
struct Fragments<A> {
    /// Where each datagram's later fragments go, until when, and whom it is charged to.
    map: HashMap<FragmentKey<A>, (A, u32, u64), foldhash::fast::RandomState>,
    order: VecDeque<(FragmentKey<A>, u32)>,
    capacity: usize,
    /// Outbound datagrams in `map` per owner, and how many one owner may have.
    per_owner: HashMap<u64, usize, foldhash::fast::RandomState>,
    source_capacity: u64,
}

impl<A: Family> Fragments<A> {
    fn expire(&mut self, now: u32) {
        while let Some(&(key, expires)) = self.order.front() {
            if expires > now {
                break;
            }
            self.order.pop_front();
            if self.map.get(&key).is_some_and(|&(_, e, _)| e == expires)
                && let Some((_, _, owner)) = self.map.remove(&key)
                && !key.inbound
            {
                release(&mut self.per_owner, owner);
            }
        }
    }
}

/// Takes one from `owner`'s count, forgetting the owner at zero.
fn release(counts: &mut HashMap<u64, usize, foldhash::fast::RandomState>, owner: u64) {
    if let Some(n) = counts.get_mut(&owner) {
        *n -= 1;
        if *n == 0 {
            counts.remove(&owner);
        }
    }
}

/// 1/`share` of `total` (at least one); no limit of its own for a share of 1.
fn share_of(total: u64, share: u32) -> u64 {
    if share <= 1 { u64::MAX } else { (total / u64::from(share)).max(1) }
}

/// What one table may hold, in all and per source address.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub max_flows: u32,
    pub max_fragments: usize,
    pub source_share: u32,
}

/// What one owner (a mesh peer, or a source address when no peer is named) holds.
#[derive(Debug, Default, Clone, Copy)]
struct SourceUse {
    flows: u32,
    mappings: [u32; 3],
}

/// Which owner a source address's flows are charged to, and how many it has: flows do not carry their
/// owner (that would cost every flow 4 bytes), so removal finds it here.
#[derive(Debug, Clone, Copy)]
struct SourceOwner {
    owner: u64,
    flows: u32,
}

#[derive(Debug)]
pub(super) struct Table<A> {
    pub addr: A,
    flows: Slab<Flow<A>>,
    flow_index: HashTable<u32>,
    mappings: Slab<Mapping<A>>,
    mapping_index: HashTable<u32>,
    pools: [PortPool; 3],
    wheel: Wheel,
    fragments: Fragments<A>,
    hasher: foldhash::fast::RandomState,
    live: u32,
    max_flows: u32,
    per_owner: HashMap<u64, SourceUse, foldhash::fast::RandomState>,
    owners: HashMap<A, SourceOwner, foldhash::fast::RandomState>,
    source_flows: u64,
    source_mappings: u64,
}

impl<A: Family> Table<A> {
    pub fn new(addr: A, first_port: u16, last_port: u16, limits: Limits, seed: u64) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        let Limits { max_flows, max_fragments, source_share } = limits;
        let ports = u32::from(last_port - first_port) + 1;
        Self {
            addr,
            flows: Slab::new(),
            flow_index: HashTable::new(),
            mappings: Slab::new(),
            mapping_index: HashTable::new(),
            pools: core::array::from_fn(|_| PortPool::new(first_port, last_port, &mut rng)),
            wheel: Wheel { slots: (0..WHEEL_SLOTS).map(|_| Vec::new()).collect(), done: 0 },
            fragments: Fragments {
                map: HashMap::default(),
                order: VecDeque::new(),
                capacity: max_fragments,
                per_owner: HashMap::default(),
                source_capacity: share_of(max_fragments as u64, source_share),
            },
            hasher: foldhash::fast::RandomState::default(),
            live: 0,
            max_flows,
            per_owner: HashMap::default(),
            owners: HashMap::default(),
            source_flows: share_of(u64::from(max_flows), source_share),
            source_mappings: share_of(u64::from(ports), source_share),
        }
    }

    pub fn live_flows(&self) -> u32 {
        self.live
    }

    pub fn mapping_count(&self) -> usize {
        self.mappings.slots() - self.mappings.free.len()
    }

    pub fn fragment_count(&self) -> usize {
        self.fragments.map.len()
    }

    #[inline]
    fn flow_hash(&self, k: &FlowKey<A>) -> u64 {
        flow_hash_with(&self.hasher, k)
    }

    #[inline]
    fn mapping_hash(&self, proto: Proto, addr: A, port: u16) -> u64 {
        mapping_hash_with(&self.hasher, proto, addr, port)
    }

    #[inline]
    pub fn flow(&self, i: u32) -> &Flow<A> {
        &self.flows[i]
    }

    #[inline]
    pub fn flow_mut(&mut self, i: u32) -> &mut Flow<A> {
        &mut self.flows[i]
    }

    #[inline]
    pub fn mapping(&self, i: u32) -> &Mapping<A> {
        &self.mappings[i]
    }

    #[inline]
    pub fn find(&self, k: &FlowKey<A>) -> Option<u32> {
        let items = &self.flows;
        self.flow_index.find(self.flow_hash(k), |&i| items[i].matches(k)).copied()
    }

    /// The mapping that owns external `port` of `proto`.
    #[inline]
    pub fn mapping_by_port(&self, proto: Proto, port: u16) -> Option<u32> {
        self.pools[proto as usize].owner(port)
    }

    /// Creates a flow for `k`, reusing the internal endpoint's mapping or allocating one. `now` is the
    /// current tick; `expire_budget` bounds the reclaiming done when the table is full.
    pub fn create(
        &mut self,
        k: FlowKey<A>,
        owner: u64,
        now: u32,
        t: &Timeouts,
        stats: &mut Stats,
    ) -> Result<u32, DropReason> {
        if self.live >= self.max_flows {
            self.expire(now, FULL_TABLE_EXPIRE_BUDGET, stats);
            if self.live >= self.max_flows {
                return Err(DropReason::TableFull);
            }
        }
        // An address stays charged to the owner that opened its first live flow.
        let owner = self.owners.get(&k.int_addr).map_or(owner, |o| o.owner);
        if self.per_owner.get(&owner).is_some_and(|u| u64::from(u.flows) >= self.source_flows) {
            return Err(DropReason::SourceOverQuota);
        }
        let mapping = self.mapping_for(k.proto, k.int_addr, k.int_port, owner)?;
        self.mappings[mapping].flows += 1;
        self.per_owner.entry(owner).or_default().flows += 1;
        self.owners.entry(k.int_addr).or_insert(SourceOwner { owner, flows: 0 }).flows += 1;
        let mut flow = Flow {
            int_addr: k.int_addr,
            remote_addr: k.remote_addr,
            int_port: k.int_port,
            remote_port: k.remote_port,
            ext_port: self.mappings[mapping].ext_port,
            mapping,
            expires: 0,
            next_check: 0,
            proto: k.proto,
            tcp: 0,
        };
        flow.expires = expiry(now, flow.timeout(t));
        flow.next_check = self.wheel.target(flow.expires, self.wheel.done);
        let i = self.flows.insert(flow);
        let hash = self.flow_hash(&k);
        let (items, hasher) = (&self.flows, &self.hasher);
        self.flow_index.insert_unique(hash, i, |&j| flow_hash_with(hasher, &items[j].key()));
        self.wheel.file(i, flow.next_check);
        self.live += 1;
        stats.flows_created += 1;
        Ok(i)
    }

    fn mapping_for(&mut self, proto: Proto, addr: A, port: u16, owner: u64) -> Result<u32, DropReason> {
        let hash = self.mapping_hash(proto, addr, port);
        let items = &self.mappings;
        if let Some(&m) = self.mapping_index.find(hash, |&m| {
            let m = &items[m];
            m.int_port == port && m.proto == proto && m.int_addr == addr
        }) {
            return Ok(m);
        }
        if self.per_owner.get(&owner).is_some_and(|u| u64::from(u.mappings[proto as usize]) >= self.source_mappings) {
            return Err(DropReason::SourceOverQuota);
        }
        let pool = &mut self.pools[proto as usize];
        let ext_port = pool.free.pop_front().ok_or(DropReason::PoolExhausted)?;
        self.per_owner.entry(owner).or_default().mappings[proto as usize] += 1;
        let m = self.mappings.insert(Mapping { int_addr: addr, int_port: port, ext_port, proto, flows: 0 });
        pool.owner[usize::from(ext_port - pool.first)] = m;
        let (items, hasher) = (&self.mappings, &self.hasher);
        self.mapping_index.insert_unique(hash, m, |&j| {
            let m = &items[j];
            mapping_hash_with(hasher, m.proto, m.int_addr, m.int_port)
        });
        Ok(m)
    }

    /// Moves a flow's expiry to `now + timeout`, filing it earlier in the wheel if the timeout shrank.
    #[inline]
    pub fn refresh(&mut self, i: u32, now: u32, t: &Timeouts) {
        let flow = &mut self.flows[i];
        let expires = expiry(now, flow.timeout(t));
        flow.expires = expires;
        if expires < flow.next_check {
            let at = self.wheel.target(expires, self.wheel.done);
            flow.next_check = at;
            self.wheel.file(i, at);
        }
    }

    fn remove(&mut self, i: u32, stats: &mut Stats) {
        let flow = self.flows[i];
        let hash = self.flow_hash(&flow.key());
        if let Ok(entry) = self.flow_index.find_entry(hash, |&j| j == i) {
            entry.remove();
        }
        self.flows[i].mapping = NONE;
        self.flows.free.push(i);
        self.live -= 1;
        stats.flows_expired += 1;

        let m = flow.mapping;
        let mapping = &mut self.mappings[m];
        mapping.flows -= 1;
        let freed = mapping.flows == 0;
        if let Some(source) = self.owners.get_mut(&flow.int_addr) {
            let owner = source.owner;
            source.flows -= 1;
            if source.flows == 0 {
                self.owners.remove(&flow.int_addr);
            }
            if let Some(used) = self.per_owner.get_mut(&owner) {
                used.flows -= 1;
                if freed {
                    used.mappings[flow.proto as usize] -= 1;
                }
                if used.flows == 0 {
                    self.per_owner.remove(&owner);
                }
            }
        }
        if freed {
            let mapping = *mapping;
            let hash = self.mapping_hash(mapping.proto, mapping.int_addr, mapping.int_port);
            if let Ok(entry) = self.mapping_index.find_entry(hash, |&j| j == m) {
                entry.remove();
            }
            let pool = &mut self.pools[mapping.proto as usize];
            pool.owner[usize::from(mapping.ext_port - pool.first)] = NONE;
            pool.free.push_back(mapping.ext_port);
            self.mappings.free.push(m);
        }
    }

    /// Processes the wheel up to tick `now`, looking at no more than `budget` entries. Returns whether it
    /// caught up. Empty ticks cost nothing worth counting, so a long idle gap is crossed in one call.
    pub fn expire(&mut self, now: u32, mut budget: usize, stats: &mut Stats) -> bool {
        self.fragments.expire(now);
        while self.wheel.done < now {
            let tick = self.wheel.done + 1;
            let slot = (tick % WHEEL_SLOTS) as usize;
            while let Some(i) = self.wheel.slots[slot].pop() {
                if budget == 0 {
                    self.wheel.slots[slot].push(i);
                    return false;
                }
                budget -= 1;
                let flow = self.flows[i];
                if flow.mapping == NONE || flow.next_check != tick {
                    continue; // superseded by an earlier filing, or the slot was freed
                }
                if flow.expires <= now {
                    self.remove(i, stats);
                } else {
                    // Filed at most one lap ahead, so never back into the slot being emptied.
                    let at = self.wheel.target(flow.expires, tick);
                    self.flows[i].next_check = at;
                    self.wheel.file(i, at);
                }
            }
            self.wheel.done = tick;
        }
        true
    }

    /// The next tick at which [`Table::expire`] has work, if anything is alive.
    pub fn next_tick(&self) -> Option<u32> {
        (self.live > 0 || !self.fragments.order.is_empty()).then_some(self.wheel.done + 1)
    }

    /// Whether a fragmented datagram with `key` can be remembered (checked before any state changes).
    pub fn fragment_room(&mut self, key: &FragmentKey<A>, owner: u64, now: u32) -> Result<(), DropReason> {
        let f = &mut self.fragments;
        f.expire(now);
        if f.map.contains_key(key) {
            return Ok(());
        }
        if f.map.len() >= f.capacity {
            return Err(DropReason::FragmentTableFull);
        }
        // Charged to the mesh client that sends them; replies (inbound) belong to flows it already holds.
        if !key.inbound && f.per_owner.get(&owner).is_some_and(|&n| n as u64 >= f.source_capacity) {
            return Err(DropReason::SourceOverQuota);
        }
        Ok(())
    }

    /// Remembers where a datagram's later fragments go. A repeated first fragment keeps the lifetime of the
    /// first, so the expiry queue holds one entry per datagram.
    pub fn remember_fragment(&mut self, key: FragmentKey<A>, translated: A, owner: u64, now: u32, t: &Timeouts) {
        let f = &mut self.fragments;
        if let Some(entry) = f.map.get_mut(&key) {
            entry.0 = translated;
            return;
        }
        let expires = expiry(now, t.fragment);
        f.map.insert(key, (translated, expires, owner));
        if !key.inbound {
            *f.per_owner.entry(owner).or_default() += 1;
        }
        f.order.push_back((key, expires));
    }

    pub fn fragment(&self, key: &FragmentKey<A>, now: u32) -> Option<A> {
        self.fragments.map.get(key).filter(|&&(_, expires, _)| expires > now).map(|&(a, _, _)| a)
    }
}

/// The tick at which something idle from `now` for `timeout` seconds expires. Ticks are whole seconds
/// truncated, so one is added: nothing expires before its full timeout has passed.
#[inline]
fn expiry(now: u32, timeout: u32) -> u32 {
    now.saturating_add(timeout).saturating_add(1)
}

/// Entries looked at when a full table tries to make room before refusing a flow: enough to reclaim what
/// is due, small enough that a flood of new flows cannot turn every packet into a long sweep.
const FULL_TABLE_EXPIRE_BUDGET: usize = 64;

#[inline]
fn flow_hash_with<A: Family>(hasher: &foldhash::fast::RandomState, k: &FlowKey<A>) -> u64 {
    let mut h = hasher.build_hasher();
    h.write_u64((k.proto as u64) << 32 | u64::from(k.int_port) << 16 | u64::from(k.remote_port));
    k.int_addr.hash_into(&mut h);
    k.remote_addr.hash_into(&mut h);
    h.finish()
}

#[inline]
fn mapping_hash_with<A: Family>(hasher: &foldhash::fast::RandomState, proto: Proto, addr: A, port: u16) -> u64 {
    let mut h = hasher.build_hasher();
    h.write_u32((proto as u32) << 16 | u32::from(port));
    addr.hash_into(&mut h);
    h.finish()
}

/// Lifetime counts kept by the tables.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub flows_created: u64,
    pub flows_expired: u64,
}

#[cfg(test)]
mod tests {
    use core::net::Ipv4Addr;

    use super::*;

    fn table() -> Table<Ipv4Addr> {
        Table::new(
            Ipv4Addr::new(192, 0, 2, 1),
            1024,
            65535,
            Limits { max_flows: 1 << 20, max_fragments: 16, source_share: 1 },
            7,
        )
    }

    fn key(port: u16) -> FlowKey<Ipv4Addr> {
        FlowKey {
            proto: Proto::Udp,
            int_addr: Ipv4Addr::new(100, 64, 0, 1),
            int_port: port,
            remote_addr: Ipv4Addr::new(10, 0, 0, 1),
            remote_port: 53,
        }
    }

    fn wheel_entries(t: &Table<Ipv4Addr>) -> usize {
        t.wheel.slots.iter().map(Vec::len).sum()
    }

    #[test]
    fn a_small_budget_still_catches_up() {
        let (mut t, timeouts, mut stats) = (table(), Timeouts::default(), Stats::default());
        for port in 0..100 {
            t.create(key(port), 1, 0, &timeouts, &mut stats).unwrap();
        }
        let mut calls = 0;
        while !t.expire(1000, 7, &mut stats) {
            calls += 1;
            assert!(calls < 100, "expiry never caught up");
        }
        assert!(calls >= 100 / 7);
        assert_eq!(t.live_flows(), 0);
        assert_eq!(t.mapping_count(), 0);
        assert_eq!(wheel_entries(&t), 0);
    }

    #[test]
    fn refreshing_never_grows_the_wheel() {
        let (mut t, timeouts, mut stats) = (table(), Timeouts::default(), Stats::default());
        let flow = t.create(key(1), 1, 0, &timeouts, &mut stats).unwrap();
        for now in 1..20_000 {
            t.refresh(flow, now, &timeouts);
            t.expire(now, usize::MAX, &mut stats);
            assert!(wheel_entries(&t) <= 1, "one flow, one entry");
        }
        assert_eq!(t.live_flows(), 1);
        assert!(t.expire(20_000 + timeouts.udp, usize::MAX, &mut stats));
        assert_eq!(t.live_flows(), 0);
    }

    #[test]
    fn a_shortened_timeout_is_honoured_and_its_old_entry_discarded() {
        let (mut t, timeouts, mut stats) = (table(), Timeouts::default(), Stats::default());
        let k = FlowKey { proto: Proto::Tcp, ..key(1) };
        let flow = t.create(k, 1, 0, &timeouts, &mut stats).unwrap();
        t.flow_mut(flow).tcp = tcp::SYN_OUT | tcp::REPLIED;
        t.refresh(flow, 10, &timeouts);
        t.expire(3000, usize::MAX, &mut stats);
        assert_eq!(t.live_flows(), 1, "established");
        t.flow_mut(flow).tcp |= tcp::FIN_OUT;
        t.refresh(flow, 3000, &timeouts);
        assert_eq!(wheel_entries(&t), 2, "filed again, earlier");
        t.expire(3000 + timeouts.tcp_transitory, usize::MAX, &mut stats);
        assert_eq!(t.live_flows(), 1, "a whole timeout has not passed within the last tick");
        t.expire(3000 + timeouts.tcp_transitory + 1, usize::MAX, &mut stats);
        assert_eq!(t.live_flows(), 0, "gone at the transitory timeout");
        t.expire(20_000, usize::MAX, &mut stats);
        assert_eq!(wheel_entries(&t), 0, "the stale entry is dropped when its slot comes round");
    }

    #[test]
    fn freed_slots_are_reused() {
        let (mut t, timeouts, mut stats) = (table(), Timeouts::default(), Stats::default());
        for round in 0..5u32 {
            for port in 0..1000 {
                t.create(key(port), 1, round * 1000, &timeouts, &mut stats).unwrap();
            }
            t.expire(round * 1000 + 999, usize::MAX, &mut stats);
            assert_eq!(t.live_flows(), 0);
        }
        assert_eq!(t.flows.slots(), 1000, "the slab does not grow past its peak");
    }

    #[test]
    fn flows_stay_small() {
        assert_eq!(size_of::<Flow<Ipv4Addr>>(), 28);
        assert_eq!(size_of::<Flow<core::net::Ipv6Addr>>(), 52);
    }
}

#[cfg(test)]
mod long_timeouts {
    use core::net::Ipv4Addr;

    use super::*;

    /// Timeouts longer than the wheel used to leave not-yet-due entries in a slot; with enough of them a
    /// bounded pass spent its whole budget on them every time and expiry stalled for good.
    #[test]
    fn timeouts_longer_than_the_wheel_never_stall_expiry() {
        let timeouts = Timeouts { udp: 3 * WHEEL_SLOTS + 17, ..Timeouts::default() };
        let mut t: Table<Ipv4Addr> = Table::new(
            Ipv4Addr::new(192, 0, 2, 1),
            1024,
            65535,
            Limits { max_flows: 1 << 20, max_fragments: 16, source_share: 1 },
            7,
        );
        let mut stats = Stats::default();
        for port in 0..5000 {
            let k = FlowKey {
                proto: Proto::Udp,
                int_addr: Ipv4Addr::new(100, 64, 0, 1),
                int_port: port,
                remote_addr: Ipv4Addr::new(10, 0, 0, 1),
                remote_port: 53,
            };
            t.create(k, 1, 0, &timeouts, &mut stats).unwrap();
        }
        let mut now = 0;
        let mut calls = 0;
        while t.live_flows() > 0 {
            now += 60;
            while !t.expire(now, 100, &mut stats) {
                calls += 1;
                assert!(calls < 10_000, "expiry stalled at {now}");
            }
            assert!(now <= timeouts.udp + 60, "flows outlived their timeout");
        }
        assert!(now > timeouts.udp, "flows expired early");
    }
}
