//! Generated inputs for tests that compare two implementations of a scanner: strings of 1 to
//! 16 pieces drawn from an alphabet of the delimiters that matter, the same each run.

/// `count` strings made of `alphabet`'s pieces, from `seed` (a linear congruential generator:
/// reproducible, no dependency).
pub(crate) fn generated<'a>(
    alphabet: &'a [&'a str],
    mut seed: u64,
    count: usize,
) -> impl Iterator<Item = String> + 'a {
    let mut next = move || {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        seed
    };
    (0..count).map(move |_| {
        let mut s = String::new();
        for _ in 0..(next() >> 60) + 1 {
            s.push_str(alphabet[(next() >> 33) as usize % alphabet.len()]);
        }
        s
    })
}
