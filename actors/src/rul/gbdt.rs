//! Gradient boosting of oblivious trees on squared error, with histogram splits.
//!
//! Oblivious (symmetric) trees use one split per level for all nodes of that level, as in
//! CatBoost: a tree of depth d is d (feature, threshold) pairs and 2^d leaves, so the
//! fitted form is three flat arrays of plain numbers, prediction is d comparisons per tree
//! with no branches to mispredict, and the shared splits regularise.
//!
//! Written here rather than taken from a crate: the Rust boosting crates (`gbdt`,
//! `smartcore`'s forests) store node graphs in their own serde shapes that neither fit a
//! catalogue's TOML table of numbers nor promise a stable layout, and none grows
//! oblivious trees.

use crate::rng::Rng;

/// What the booster needs to know.
#[derive(Debug, Clone)]
pub(crate) struct BoostOptions {
    pub trees: usize,
    pub depth: usize,
    pub learning_rate: f64,
    pub l2: f64,
    pub subsample: f64,
    pub bins: usize,
    pub min_leaf: f64,
}

/// Fitted trees, in the layout of [`super::RulParams`].
#[derive(Debug, Clone, Default)]
pub(crate) struct Boosted {
    pub base: f64,
    pub split_features: Vec<u32>,
    pub split_thresholds: Vec<f64>,
    pub leaves: Vec<f64>,
}

/// Fits `y ≈ base + Σ trees(x)`; `x` is row-major with `nf` features per row.
pub(crate) fn boost(x: &[f64], nf: usize, y: &[f64], o: &BoostOptions, rng: &mut Rng) -> Boosted {
    let rows = y.len();
    debug_assert_eq!(x.len(), rows * nf);
    let (edges, bins) = bin(x, nf, rows, o.bins);
    let nb = edges.iter().map(|e| e.len() + 1).max().unwrap_or(1);
    let base = y.iter().sum::<f64>() / rows.max(1) as f64;
    let mut pred = vec![base; rows];
    let mut out = Boosted {
        base,
        ..Boosted::default()
    };
    let mut resid = vec![0.0; rows];
    let mut leaf = vec![0usize; rows];
    let mut sampled: Vec<usize> = Vec::with_capacity(rows);
    let mut hist_g = vec![0.0; nb << o.depth];
    let mut hist_c = vec![0.0; nb << o.depth];
    for _ in 0..o.trees {
        sampled.clear();
        for r in 0..rows {
            if o.subsample >= 1.0 || rng.next_f64() < o.subsample {
                sampled.push(r);
            }
        }
        for r in 0..rows {
            resid[r] = y[r] - pred[r];
            leaf[r] = 0;
        }
        let mut splits: Vec<(usize, usize)> = Vec::with_capacity(o.depth);
        for d in 0..o.depth {
            let leaves = 1usize << d;
            // Best (gain, feature, bin) over all features at this level.
            let mut best: Option<(f64, usize, usize)> = None;
            for f in 0..nf {
                let n_edges = edges[f].len();
                if n_edges == 0 {
                    continue;
                }
                let col = &bins[f * rows..(f + 1) * rows];
                let h = nb * leaves;
                hist_g[..h].fill(0.0);
                hist_c[..h].fill(0.0);
                for &r in &sampled {
                    let i = leaf[r] * nb + usize::from(col[r]);
                    hist_g[i] += resid[r];
                    hist_c[i] += 1.0;
                }
                // Gain of splitting after bin b, summed over this level's leaves.
                let mut gain = vec![0.0; n_edges];
                let mut valid = vec![true; n_edges];
                for l in 0..leaves {
                    let g = &hist_g[l * nb..l * nb + n_edges + 1];
                    let c = &hist_c[l * nb..l * nb + n_edges + 1];
                    let (gt, ct): (f64, f64) = (g.iter().sum(), c.iter().sum());
                    let (mut gl, mut cl) = (0.0, 0.0);
                    for b in 0..n_edges {
                        gl += g[b];
                        cl += c[b];
                        let (gr, cr) = (gt - gl, ct - cl);
                        if ct > 0.0 && (cl < o.min_leaf || cr < o.min_leaf) {
                            valid[b] = false;
                        }
                        gain[b] +=
                            gl * gl / (cl + o.l2) + gr * gr / (cr + o.l2) - gt * gt / (ct + o.l2);
                    }
                }
                for b in 0..n_edges {
                    if valid[b] && gain[b] > 1e-9 && best.is_none_or(|(bg, _, _)| gain[b] > bg) {
                        best = Some((gain[b], f, b));
                    }
                }
            }
            let Some((_, f, b)) = best else {
                // Nothing worth splitting (or leaves too small): the level splits nowhere,
                // expressed as a threshold no value exceeds.
                splits.push((usize::MAX, 0));
                continue;
            };
            splits.push((f, b));
            let col = &bins[f * rows..(f + 1) * rows];
            for r in 0..rows {
                if usize::from(col[r]) > b {
                    leaf[r] |= 1 << d;
                }
            }
        }
        let n_leaves = 1usize << o.depth;
        let mut g = vec![0.0; n_leaves];
        let mut c = vec![0.0; n_leaves];
        for &r in &sampled {
            g[leaf[r]] += resid[r];
            c[leaf[r]] += 1.0;
        }
        let values: Vec<f64> = (0..n_leaves)
            .map(|l| o.learning_rate * g[l] / (c[l] + o.l2))
            .collect();
        for r in 0..rows {
            pred[r] += values[leaf[r]];
        }
        for &(f, b) in &splits {
            if f == usize::MAX {
                out.split_features.push(0);
                out.split_thresholds.push(f64::MAX);
            } else {
                out.split_features.push(f as u32);
                out.split_thresholds.push(edges[f][b]);
            }
        }
        out.leaves.extend(values);
    }
    out
}

/// Quantile bin edges per feature and the bin of every value, column-major.
///
/// A value `v` falls in bin `edges.partition_point(|e| e < v)`, so `bin(v) > b` exactly
/// when `v > edges[b]`: a split after bin `b` is the threshold `edges[b]` at prediction.
fn bin(x: &[f64], nf: usize, rows: usize, max_bins: usize) -> (Vec<Vec<f64>>, Vec<u8>) {
    let max_bins = max_bins.clamp(2, 256);
    let mut edges = Vec::with_capacity(nf);
    let mut bins = vec![0u8; nf * rows];
    let mut col = vec![0.0; rows];
    for f in 0..nf {
        for r in 0..rows {
            col[r] = x[r * nf + f];
        }
        let mut sorted = col.clone();
        sorted.sort_by(f64::total_cmp);
        let mut e: Vec<f64> = Vec::with_capacity(max_bins);
        for q in 1..max_bins {
            let v = sorted[(q * rows / max_bins).min(rows.saturating_sub(1))];
            if e.last().is_none_or(|&last| v > last) {
                e.push(v);
            }
        }
        // An edge at the maximum splits nothing off.
        if e.last()
            .is_some_and(|&last| sorted.last().is_some_and(|&m| last >= m))
        {
            e.pop();
        }
        for r in 0..rows {
            bins[f * rows + r] = e.partition_point(|&v| v < col[r]) as u8;
        }
        edges.push(e);
    }
    (edges, bins)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_a_step_and_a_ramp() {
        let rows = 400;
        let nf = 2;
        let mut x = Vec::new();
        let mut y = Vec::new();
        for r in 0..rows {
            let a = r as f64 / rows as f64;
            let b = (r * 7 % 13) as f64;
            x.extend([a, b]);
            y.push(if a > 0.5 { 10.0 } else { 0.0 } + b);
        }
        let o = BoostOptions {
            trees: 200,
            depth: 3,
            learning_rate: 0.2,
            l2: 1.0,
            subsample: 1.0,
            bins: 32,
            min_leaf: 1.0,
        };
        let m = boost(&x, nf, &y, &o, &mut Rng::new(1));
        let mse: f64 = (0..rows)
            .map(|r| {
                let mut p = m.base;
                for t in 0..o.trees {
                    let mut idx = 0;
                    for d in 0..o.depth {
                        let i = t * o.depth + d;
                        let f = m.split_features[i] as usize;
                        idx |= usize::from(x[r * nf + f] > m.split_thresholds[i]) << d;
                    }
                    p += m.leaves[(t << o.depth) + idx];
                }
                (p - y[r]).powi(2)
            })
            .sum::<f64>()
            / rows as f64;
        assert!(mse < 0.5, "training mse {mse}");
    }
}
