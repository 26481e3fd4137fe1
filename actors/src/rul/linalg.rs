//! Ridge regression by the normal equations: a Cholesky solve of a system of 15
//! unknowns, too small to bring in a linear-algebra crate for.

/// Accumulates `XᵀX` and `Xᵀy` for `y ≈ b + w·x`, then solves with an L2 penalty on `w`
/// (not on the intercept `b`).
#[derive(Debug, Clone)]
pub(crate) struct Ridge {
    n: usize,
    /// (n+1)×(n+1), row-major; index 0 is the intercept.
    xtx: Vec<f64>,
    xty: Vec<f64>,
    rows: usize,
}

impl Ridge {
    pub(crate) fn new(n: usize) -> Self {
        Self {
            n,
            xtx: vec![0.0; (n + 1) * (n + 1)],
            xty: vec![0.0; n + 1],
            rows: 0,
        }
    }

    pub(crate) fn add(&mut self, x: &[f64], y: f64) {
        debug_assert_eq!(x.len(), self.n);
        let m = self.n + 1;
        let at = |i: usize| if i == 0 { 1.0 } else { x[i - 1] };
        for i in 0..m {
            let xi = at(i);
            self.xty[i] += xi * y;
            for j in 0..=i {
                self.xtx[i * m + j] += xi * at(j);
            }
        }
        self.rows += 1;
    }

    /// (intercept, weights) minimising `Σ(y − b − w·x)² + alpha·rows·|w|²`, or `None`
    /// when the system is singular.
    pub(crate) fn solve(&self, alpha: f64) -> Option<(f64, Vec<f64>)> {
        let m = self.n + 1;
        let mut a = vec![0.0; m * m];
        for i in 0..m {
            for j in 0..=i {
                a[i * m + j] = self.xtx[i * m + j];
                a[j * m + i] = self.xtx[i * m + j];
            }
            if i > 0 {
                a[i * m + i] += alpha * self.rows as f64;
            }
        }
        let sol = cholesky_solve(&mut a, &self.xty, m)?;
        Some((sol[0], sol[1..].to_vec()))
    }
}

/// Solves `A x = b` for symmetric positive-definite `A` (overwritten with its factor).
fn cholesky_solve(a: &mut [f64], b: &[f64], m: usize) -> Option<Vec<f64>> {
    for j in 0..m {
        let mut d = a[j * m + j];
        for k in 0..j {
            d -= a[j * m + k] * a[j * m + k];
        }
        if d.is_nan() || d <= 1e-12 {
            return None;
        }
        let d = d.sqrt();
        a[j * m + j] = d;
        for i in j + 1..m {
            let mut s = a[i * m + j];
            for k in 0..j {
                s -= a[i * m + k] * a[j * m + k];
            }
            a[i * m + j] = s / d;
        }
    }
    let mut y = vec![0.0; m];
    for i in 0..m {
        let mut s = b[i];
        for k in 0..i {
            s -= a[i * m + k] * y[k];
        }
        y[i] = s / a[i * m + i];
    }
    let mut x = vec![0.0; m];
    for i in (0..m).rev() {
        let mut s = y[i];
        for k in i + 1..m {
            s -= a[k * m + i] * x[k];
        }
        x[i] = s / a[i * m + i];
    }
    Some(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovers_a_linear_law() {
        let mut r = Ridge::new(2);
        for i in 0..50 {
            let (a, b) = (f64::from(i), f64::from(i * i % 7));
            r.add(&[a, b], 3.0 + 2.0 * a - 0.5 * b);
        }
        let (b0, w) = r.solve(0.0).expect("solvable");
        assert!(
            (b0 - 3.0).abs() < 1e-6 && (w[0] - 2.0).abs() < 1e-9,
            "{b0} {w:?}"
        );
        assert!((w[1] + 0.5).abs() < 1e-9, "{w:?}");
    }
}
