//! Health index: per signal in `0..=1`, and combined per device.

use crate::model::Direction;

/// Health of one signal at `value`, in `0..=1`.
///
/// With a failure threshold: 1 at (or on the safe side of) the centre of the normal
/// range, 0 at or beyond the threshold, linear in between along `direction`. Without one
/// (or when the threshold is not beyond the centre in its direction): 1 at the centre,
/// ½ at either edge of the normal range, 0 at half a range-width beyond an edge, linear in
/// between. A non-finite value has health 0.
pub fn health_index(
    value: f64,
    normal_min: f64,
    normal_max: f64,
    failure: Option<(f64, Direction)>,
) -> f64 {
    if !value.is_finite() {
        return 0.0;
    }
    let center = 0.5 * (normal_min + normal_max);
    if let Some((threshold, direction)) = failure {
        let span = (threshold - center) * direction.sign();
        if span > 0.0 {
            let toward = (value - center) * direction.sign();
            return 1.0 - (toward / span).clamp(0.0, 1.0);
        }
    }
    let width = normal_max - normal_min;
    if width > 0.0 {
        1.0 - ((value - center).abs() / width).clamp(0.0, 1.0)
    } else if value == center {
        1.0
    } else {
        0.0
    }
}

/// A device's health as its weakest signal's: the minimum of `healths` (1 when there are
/// none). The default for devices, since one failing part fails the device; non-finite
/// entries count as 0.
pub fn min_health(healths: impl IntoIterator<Item = f64>) -> f64 {
    healths
        .into_iter()
        .map(|h| {
            if h.is_finite() {
                h.clamp(0.0, 1.0)
            } else {
                0.0
            }
        })
        .fold(1.0, f64::min)
}

/// A device's health as the weighted mean of `(health, weight)` pairs, for dashboards
/// where signals matter unequally. Pairs with a non-positive or non-finite weight are
/// skipped; 1 when none remain. Non-finite healths count as 0.
pub fn weighted_health(items: impl IntoIterator<Item = (f64, f64)>) -> f64 {
    let (mut sum, mut total) = (0.0, 0.0);
    for (h, w) in items {
        if w.is_finite() && w > 0.0 {
            let h = if h.is_finite() {
                h.clamp(0.0, 1.0)
            } else {
                0.0
            };
            sum += w * h;
            total += w;
        }
    }
    if total > 0.0 { sum / total } else { 1.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_from_centre_to_threshold_in_the_failure_direction() {
        // Pressure: normal 8..10 bar, fails falling to 6.
        let f = Some((6.0, Direction::Falling));
        assert_eq!(health_index(9.0, 8.0, 10.0, f), 1.0);
        assert_eq!(
            health_index(9.8, 8.0, 10.0, f),
            1.0,
            "safe side of the centre"
        );
        assert!((health_index(7.5, 8.0, 10.0, f) - 0.5).abs() < 1e-12);
        assert_eq!(health_index(6.0, 8.0, 10.0, f), 0.0);
        assert_eq!(health_index(2.0, 8.0, 10.0, f), 0.0);
        // Temperature: normal 2..6, fails rising to 10.
        let r = Some((10.0, Direction::Rising));
        assert!((health_index(7.0, 2.0, 6.0, r) - 0.5).abs() < 1e-12);
        assert_eq!(health_index(f64::NAN, 2.0, 6.0, r), 0.0);
    }

    #[test]
    fn without_threshold_edges_are_half_health() {
        assert_eq!(health_index(5.0, 0.0, 10.0, None), 1.0);
        assert!((health_index(10.0, 0.0, 10.0, None) - 0.5).abs() < 1e-12);
        assert!((health_index(0.0, 0.0, 10.0, None) - 0.5).abs() < 1e-12);
        assert_eq!(health_index(15.0, 0.0, 10.0, None), 0.0);
        // A threshold on the wrong side of the centre falls back to the range rule.
        assert!(
            (health_index(10.0, 0.0, 10.0, Some((1.0, Direction::Rising))) - 0.5).abs() < 1e-12
        );
    }

    #[test]
    fn combining() {
        assert_eq!(min_health([0.9, 0.3, 1.0]), 0.3);
        assert_eq!(min_health([]), 1.0);
        assert_eq!(min_health([0.5, f64::NAN]), 0.0);
        assert!((weighted_health([(1.0, 1.0), (0.0, 3.0)]) - 0.25).abs() < 1e-12);
        assert_eq!(weighted_health([(0.2, 0.0), (0.4, f64::NAN)]), 1.0);
    }
}
