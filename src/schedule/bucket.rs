//! Length bucketing: rows ordered by length inside seeded shuffle windows, so that padded batches waste
//! less without changing what any batch's loss means.

use super::splitmix64;

/// Length bucketing: a seeded shuffle of the row indices, then each window of `window` rows sorted by
/// length (ties by index). Consecutive batches of the result hold rows of similar length; a different
/// seed (say, per epoch) gives a different order, the same seed the same one.
pub fn bucket_order(lens: &[usize], window: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    let mut state = seed;
    for i in (1..order.len()).rev() {
        let j = (splitmix64(&mut state) % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    for chunk in order.chunks_mut(window.max(1)) {
        chunk.sort_by_key(|&i| (lens[i], i));
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucketing_is_a_reproducible_permutation() {
        let lens: Vec<usize> = (0..100).map(|i| (i * 37) % 23).collect();
        let a = bucket_order(&lens, 16, 7);
        assert_eq!(a, bucket_order(&lens, 16, 7));
        assert_ne!(a, bucket_order(&lens, 16, 8));
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        for chunk in a.chunks(16) {
            assert!(chunk.windows(2).all(|w| lens[w[0]] <= lens[w[1]]));
        }
    }
}
