//! A bitmap of used units (a power-of-two number of bytes) over a partition.

#[derive(Debug, Clone)]
pub struct UsedMap {
    unit: u64,
    len: u64,
    bits: Vec<u64>,
}

impl UsedMap {
    pub fn new(unit: u64, len: u64) -> Self {
        let unit = unit.max(512).next_power_of_two();
        let units = len.div_ceil(unit);
        UsedMap {
            unit,
            len,
            bits: vec![0; units.div_ceil(64) as usize],
        }
    }

    pub fn all_used(len: u64) -> Self {
        let mut m = Self::new(4096, len);
        m.mark_range(0, len);
        m
    }

    pub fn unit(&self) -> u64 {
        self.unit
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn units(&self) -> u64 {
        self.len.div_ceil(self.unit)
    }

    fn get(&self, u: u64) -> bool {
        self.bits
            .get((u / 64) as usize)
            .is_some_and(|w| w & (1 << (u % 64)) != 0)
    }

    /// Mark units [first, first + count).
    fn set_units(&mut self, first: u64, count: u64) {
        let end = (first + count).min(self.units());
        let mut u = first;
        while u < end {
            let w = (u / 64) as usize;
            let bit = u % 64;
            let n = (64 - bit).min(end - u);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            self.bits[w] |= mask;
            u += n;
        }
    }

    /// Marks every unit touching the range (clamped to the partition).
    pub fn mark_range(&mut self, byte_off: u64, byte_len: u64) {
        if byte_len == 0 || byte_off >= self.len {
            return;
        }
        let end = byte_off.saturating_add(byte_len).min(self.len);
        let first = byte_off / self.unit;
        let last = (end - 1) / self.unit;
        self.set_units(first, last - first + 1);
    }

    pub fn is_used(&self, byte_off: u64) -> bool {
        byte_off < self.len && self.get(byte_off / self.unit)
    }

    pub fn used_bytes(&self) -> u64 {
        let ones: u64 = self.bits.iter().map(|w| u64::from(w.count_ones())).sum();
        let mut total = ones * self.unit;
        let units = self.units();
        if units > 0 && self.get(units - 1) {
            total -= units * self.unit - self.len;
        }
        total
    }

    /// Used byte ranges inside [start, start+len), merged, sorted and clamped.
    pub fn used_ranges(&self, start: u64, len: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let end = start.saturating_add(len).min(self.len);
        if start >= end {
            return out;
        }
        let mut push = |s: u64, e: u64| {
            let (s, e) = ((s * self.unit).max(start), (e * self.unit).min(end));
            if s < e {
                match out.last_mut() {
                    Some(l) if l.0 + l.1 == s => l.1 += e - s,
                    _ => out.push((s, e - s)),
                }
            }
        };
        let mut u = start / self.unit;
        let last = (end - 1) / self.unit;
        let mut run: Option<u64> = None;
        while u <= last {
            // Whole words at a time where possible: free space is mostly long zero runs.
            if u.is_multiple_of(64) && u + 64 <= last + 1 {
                let w = self.bits.get((u / 64) as usize).copied().unwrap_or(0);
                if w == 0 {
                    if let Some(s) = run.take() {
                        push(s, u);
                    }
                    u += 64;
                    continue;
                }
                if w == u64::MAX {
                    run.get_or_insert(u);
                    u += 64;
                    continue;
                }
            }
            if self.get(u) {
                run.get_or_insert(u);
            } else if let Some(s) = run.take() {
                push(s, u);
            }
            u += 1;
        }
        if let Some(s) = run {
            push(s, last + 1);
        }
        out
    }

    pub fn any_used(&self, start: u64, len: u64) -> bool {
        !self.used_ranges(start, len).is_empty()
    }

    /// Halve the resolution until the bitmap fits `max_bytes`; a coarse unit is used if any of
    /// its parts was, so nothing used is ever lost.
    pub fn coarsen_to(&mut self, max_bytes: usize) {
        while self.bits.len() * 8 > max_bytes.max(8) {
            let old_units = self.units();
            let mut next = UsedMap::new(self.unit * 2, self.len);
            for u in 0..old_units {
                if self.get(u) {
                    next.set_units(u / 2, 1);
                }
            }
            *self = next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_and_clamp() {
        let mut m = UsedMap::new(4096, 10 * 4096 + 100);
        m.mark_range(4096, 8192);
        m.mark_range(5 * 4096 + 1, 1);
        m.mark_range(10 * 4096, 4096);
        assert_eq!(
            m.used_ranges(0, 1 << 20),
            vec![(4096, 8192), (5 * 4096, 4096), (10 * 4096, 100)]
        );
        assert_eq!(m.used_ranges(6000, 4096), vec![(6000, 4096)]);
        assert_eq!(m.used_bytes(), 3 * 4096 + 100);
        assert!(m.is_used(4096) && !m.is_used(0) && !m.any_used(0, 4096));
    }

    #[test]
    fn long_runs_across_words() {
        let mut m = UsedMap::new(512, 1 << 20);
        m.mark_range(512 * 3, 512 * 200);
        assert_eq!(m.used_ranges(0, 1 << 20), vec![(1536, 512 * 200)]);
        m.mark_range(0, 1 << 20);
        assert_eq!(m.used_ranges(0, 1 << 20), vec![(0, 1 << 20)]);
    }

    #[test]
    fn coarsen_keeps_everything_used() {
        let mut m = UsedMap::new(512, 64 << 20);
        m.mark_range(12345, 1);
        m.mark_range(40 << 20, 512);
        m.coarsen_to(64);
        assert!(m.unit() > 512);
        assert!(m.is_used(12345) && m.is_used(40 << 20));
        assert!(m.used_bytes() < 64 << 20);
    }
}
