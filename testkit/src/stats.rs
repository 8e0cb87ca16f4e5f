//! Summaries of benchmark rounds.

/// The median of `values`: the middle value, or the mean of the two middle values of an
/// even count; NaN when there are none. The input need not be sorted.
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::median;

    #[track_caller]
    fn check(values: &[f64], expected: f64) {
        assert_eq!(median(values), expected, "median of {values:?}");
    }

    #[test]
    fn odd_counts_take_the_middle() {
        check(&[3.0], 3.0);
        check(&[5.0, 1.0, 3.0], 3.0);
        check(&[7.0, 1.0, 2.0, 9.0, 4.0], 4.0);
    }

    #[test]
    fn even_counts_average_the_middle() {
        check(&[4.0, 1.0, 3.0, 2.0], 2.5);
        check(&[2.0, 1.0], 1.5);
    }

    #[test]
    fn no_values_have_no_median() {
        assert!(median(&[]).is_nan());
    }
}
