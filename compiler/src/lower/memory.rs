//! Liveness-based arena planning: every arena buffer lives from the launch that writes it to the last
//! launch that reads it (inclusive); buffers whose lifetimes overlap get disjoint byte ranges, others
//! may share. Greedy best-known heuristic: place the largest buffers first, each at the lowest
//! aligned offset that fits between the buffers already placed and live at the same time.

/// Offsets are multiples of this (the widest vector access a kernel may make, and cudaMalloc's
/// alignment).
pub const ALIGN: u64 = 256;

/// One buffer to place: its size and its live steps `first..=last`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetime {
    pub bytes: u64,
    pub first: usize,
    pub last: usize,
}

impl Lifetime {
    pub fn overlaps(&self, other: &Lifetime) -> bool {
        self.first <= other.last && other.first <= self.last
    }
}

/// Offsets (in the order of the input) and the arena size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub offsets: Vec<u64>,
    pub arena_bytes: u64,
}

fn align(n: u64) -> u64 {
    n.div_ceil(ALIGN).saturating_mul(ALIGN)
}

pub fn plan(buffers: &[Lifetime]) -> Placement {
    let mut order: Vec<usize> = (0..buffers.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(buffers[i].bytes), buffers[i].first, i));
    let mut offsets = vec![0u64; buffers.len()];
    let mut placed: Vec<usize> = Vec::new();
    let mut arena_bytes = 0u64;
    for i in order {
        let me = buffers[i];
        let size = align(me.bytes.max(1));
        let mut busy: Vec<(u64, u64)> = placed
            .iter()
            .filter(|&&j| buffers[j].overlaps(&me))
            .map(|&j| (offsets[j], offsets[j] + align(buffers[j].bytes.max(1))))
            .collect();
        busy.sort_unstable();
        let mut offset = 0u64;
        for (start, end) in busy {
            if offset + size <= start {
                break;
            }
            offset = offset.max(end);
        }
        offsets[i] = offset;
        arena_bytes = arena_bytes.max(offset + size);
        placed.push(i);
    }
    Placement { offsets, arena_bytes }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_disjoint(buffers: &[Lifetime], p: &Placement) {
        for i in 0..buffers.len() {
            assert_eq!(p.offsets[i] % ALIGN, 0);
            assert!(p.offsets[i] + buffers[i].bytes <= p.arena_bytes);
            for j in 0..i {
                if buffers[i].overlaps(&buffers[j]) {
                    let (a, b) = (p.offsets[i], p.offsets[i] + buffers[i].bytes);
                    let (c, d) = (p.offsets[j], p.offsets[j] + buffers[j].bytes);
                    assert!(b <= c || d <= a, "buffers {i} {:?} and {j} {:?} overlap", buffers[i], buffers[j]);
                }
            }
        }
    }

    #[test]
    fn chain_reuses_memory() {
        // x0 -> x1 -> x2 -> x3: each buffer is read only by the next launch, so two slots suffice.
        let buffers: Vec<Lifetime> = (0..4).map(|k| Lifetime { bytes: 1000, first: k, last: k + 1 }).collect();
        let p = plan(&buffers);
        check_disjoint(&buffers, &p);
        assert_eq!(p.arena_bytes, 2 * align(1000));
    }

    #[test]
    fn simultaneously_live_buffers_never_overlap() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |m: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % m
        };
        for _ in 0..50 {
            let buffers: Vec<Lifetime> = (0..40)
                .map(|_| {
                    let first = next(30) as usize;
                    Lifetime { bytes: 1 + next(10_000), first, last: first + next(8) as usize }
                })
                .collect();
            let p = plan(&buffers);
            check_disjoint(&buffers, &p);
            let total: u64 = buffers.iter().map(|b| align(b.bytes)).sum();
            assert!(p.arena_bytes < total, "no reuse: {} of {total}", p.arena_bytes);
            // Never worse than the peak of simultaneously live bytes by more than the sum (sanity) and
            // never below it (a lower bound of any valid plan).
            let peak = (0..40)
                .map(|t| buffers.iter().filter(|b| b.first <= t && t <= b.last).map(|b| align(b.bytes)).sum::<u64>())
                .max()
                .unwrap_or(0);
            assert!(p.arena_bytes >= peak);
        }
    }
}
