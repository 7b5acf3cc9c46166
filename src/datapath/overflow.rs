//! Overflow: packets whose flow found the kernel map full arrive through
//! the ring buffer; user space merges them per flow, bounded, and counts
//! what it cannot keep.

use std::collections::HashMap;

use super::{as_bytes, RawEvent, RawKey};
use crate::flow::{proto, Sample};

/// Overflow packets merged per flow, bounded.
#[derive(Default)]
pub(super) struct Overflow {
    pub(super) flows: HashMap<KeyBytes, Sample>,
    pub(super) cap: usize,
    pub(super) dropped: u64,
}

pub(super) type KeyBytes = [u8; std::mem::size_of::<RawKey>()];

pub(super) fn key_bytes(k: &RawKey) -> KeyBytes {
    let mut out = [0u8; std::mem::size_of::<RawKey>()];
    out.copy_from_slice(as_bytes(k));
    out
}

impl Overflow {
    pub(super) fn add(&mut self, e: &RawEvent) {
        let kb = key_bytes(&e.key);
        let len = self.flows.len();
        let side = (e.side & 1) as usize;
        let entry = match self.flows.get_mut(&kb) {
            Some(s) => s,
            None if len >= self.cap => {
                self.dropped += 1;
                return;
            }
            None => {
                let s = Sample {
                    first_seen_ns: e.ts_ns,
                    first_side: side as u8 + 1,
                    ..Default::default()
                };
                self.flows.entry(kb).or_insert(s)
            }
        };
        entry.packets[side] += 1;
        entry.bytes[side] += e.bytes;
        entry.tcp_flags[side] |= e.tcp_flags;
        entry.first_seen_ns = entry.first_seen_ns.min(e.ts_ns);
        entry.last_seen_ns = entry.last_seen_ns.max(e.ts_ns);
        if e.opens != 0 && e.key.proto == proto::TCP {
            entry.syns += 1;
        }
        if e.opens != 0 && entry.open_side == 0 {
            entry.open_side = side as u8 + 1;
            if e.key.proto == proto::TCP {
                entry.syn_ns = e.ts_ns;
            }
        }
        if e.synack != 0 && entry.synack_ns == 0 {
            entry.synack_ns = e.ts_ns;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(port: u16, side: u32) -> RawEvent {
        RawEvent {
            key: RawKey {
                ifindex: 3,
                port: [port, 53],
                proto: 17,
                family: 4,
                ..Default::default()
            },
            side,
            bytes: 100,
            ts_ns: 1000 + port as u64,
            jiffies: 0,
            tcp_flags: 0,
            opens: 0,
            synack: 0,
            pad: [0; 2],
        }
    }

    #[test]
    fn the_overflow_table_is_bounded_and_counts_what_it_cannot_keep() {
        let mut o = Overflow {
            cap: 2,
            ..Default::default()
        };
        for p in [1, 1, 2, 3, 3, 2] {
            o.add(&event(p, 0));
        }
        o.add(&event(1, 1));
        assert_eq!(o.flows.len(), 2);
        assert_eq!(
            o.dropped, 2,
            "both packets of flow 3 are counted as dropped"
        );
        let f1 = o.flows[&key_bytes(&event(1, 0).key)];
        assert_eq!(
            (f1.packets, f1.bytes, f1.first_seen_ns, f1.last_seen_ns),
            ([2, 1], [200, 100], 1001, 1001)
        );
        let f2 = o.flows[&key_bytes(&event(2, 0).key)];
        assert_eq!(f2.packets, [2, 0]);
    }
}
