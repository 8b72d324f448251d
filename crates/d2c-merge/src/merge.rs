//! The merge engine: many LoRA adapters in, one out.
//!
//! Every input `i` contributes, for every target it has, the delta `w_i * s_i * B_i A_i`
//! (`s_i = alpha_i / r_i`, or 1 when its alpha is 0); a target an input lacks counts as a zero
//! delta. Weights default to `1 / N`, so the reference every operator aims at is the average of
//! the inputs' deltas. Inputs may have different ranks and alphas; they must share the
//! architecture and, for every target they have in common, its shape ([`check_compatible`]).
//!
//! Operators, per target (targets are processed in parallel with rayon):
//! - `cat`: `A' = vstack(A_i)`, `B' = hstack(w_i s_i B_i)`: exactly the weighted sum, rank `sum r_i`.
//! - `svd` (default): the best rank-`r` approximation (Frobenius, Eckart-Young) of the weighted
//!   sum, from the factors alone, `R = sum r_i`: the stacked `B` (out x R) is orthogonalised
//!   through its Gram matrix (Cholesky QR, `B = Q L^T`, `Q` never formed), and the R x R matrix
//!   `L^T (A A^T) L` (the Gram of the QR core `L^T A`) gives the singular values and left vectors
//!   of the delta in one symmetric eigendecomposition; keep `r`. All in f64 from the f32
//!   factors. Never forms an out x in matrix; costs `O((in + out) R^2 + R^3)`.
//! - `ties` (Yadav et al., 2023): per input trim to the `density` fraction of largest-magnitude
//!   entries, elect each entry's sign by the (weighted) sum, average the entries that agree with
//!   it; then back to rank `r` by a truncated (randomised) SVD whose error is measured.
//! - `dare` (Yu et al., 2024): per input drop each entry with probability `1 - density` and
//!   rescale the kept ones by `1 / density`, then the weighted sum; then back to rank `r` as `ties`.
//! - `linear`: PEFT's factor-wise average `A' = sum sqrt(w_i s_i) A_i`, `B' = sum sqrt(w_i s_i) B_i`
//!   (equal ranks only). It carries cross terms `B_i A_j`; it is here only as a baseline.
//! - `regmean` (Jin et al., 2023, "Dataless knowledge fusion"), needs each input's activations
//!   ([`merge_with_inputs`]): the delta that changes every task's projection outputs most like
//!   its own delta does, on the inputs its examples give that projection. With `G_i` the Gram of
//!   task i's input rows (per row, its off-diagonal scaled by [`REGMEAN_OFF_DIAGONAL`] so that
//!   directions the few examples never excite fall back to a per-feature weighted average),
//!   `M = W (sum_i w_i s_i B_i A_i G_i) H^{-1}`, `H = sum_i |w_i| G_i`, `W = sum_i |w_i|`: the
//!   least-squares fit of every task's own output change on its inputs, and exactly the
//!   weighted sum when all `G_i` are equal. Rank `r` in that same norm: with `H = L L^T`, the svd operator
//!   on `M L = sum (w_i s_i sum|w|) B_i (A_i G_i L^{-T})` (rank `R`, from factors), then
//!   `A <- A L^{-1}`. One `in x in` Cholesky per target; no `out x in` matrix.
//!
//! The output's scale is folded into `B`: every written target gives its delta as `B A` with
//! scale 1 (alpha = r when all targets have the same rank r, else alpha = 0).

use std::collections::{BTreeMap, BTreeSet};

use faer::{Mat, Par};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::interference::InputRows;
use crate::linalg;
use d2c_format::adapter::{LoraAdapter, LoraTarget};
use d2c_format::error::{Error, Result};
use d2c_format::gguf::{Value, ValueType};

pub const KEY_METHOD: &str = "d2c.merge.method";
pub const KEY_N_INPUTS: &str = "d2c.merge.n_inputs";
pub const KEY_WEIGHTS: &str = "d2c.merge.weights";
pub const KEY_TASKS: &str = "d2c.merge.tasks";
pub const KEY_DENSITY: &str = "d2c.merge.density";
pub const KEY_SEED: &str = "d2c.merge.seed";
/// Relative Frobenius error of the written adapter against what the operator aimed at.
pub const KEY_REL_ERROR: &str = "d2c.merge.relative_error";
const KEY_PREFIX: &str = "d2c.merge.";

/// Merge operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, clap::ValueEnum)]
pub enum Method {
    /// Exact weighted sum, rank = the ranks summed.
    Cat,
    /// Best rank-r approximation of the weighted sum.
    #[default]
    Svd,
    /// TIES (trim, elect signs, disjoint mean), back to rank r.
    Ties,
    /// DARE (random drop and rescale), back to rank r.
    Dare,
    /// PEFT's factor-wise average (a baseline).
    Linear,
    /// RegMean: each task's delta kept on the inputs its examples give each projection (needs
    /// the examples: `merge` only), rank r.
    Regmean,
}

impl Method {
    /// The operators that need nothing but the adapters (regmean also needs activations).
    pub const FROM_WEIGHTS: [Method; 5] = [Method::Cat, Method::Svd, Method::Ties, Method::Dare, Method::Linear];

    /// Whether `MergeOptions::rank` sets the output rank (cat and linear fix it themselves).
    pub fn uses_rank(self) -> bool {
        matches!(self, Method::Svd | Method::Ties | Method::Dare | Method::Regmean)
    }

    /// Whether merging needs each input's activations ([`merge_with_inputs`]).
    pub fn needs_inputs(self) -> bool {
        self == Method::Regmean
    }

    /// Whether `MergeOptions::density` (and, for dare, `seed`) are used.
    pub fn uses_density(self) -> bool {
        matches!(self, Method::Ties | Method::Dare)
    }
}

d2c_format::value_names!(Method, "merge method");

#[derive(Debug, Clone, PartialEq)]
pub struct MergeOptions {
    pub method: Method,
    /// Output rank for svd/ties/dare (default: the largest input rank). A target whose merged
    /// delta has lower rank than this (fewer inputs, small shapes) gets that lower rank.
    /// Ignored by cat (rank = sum of the input ranks) and linear (rank = the input rank).
    pub rank: Option<usize>,
    /// One weight per input (default `1 / N` each: the average of the deltas).
    pub weights: Option<Vec<f32>>,
    /// Fraction of entries kept per input by ties (trim) and dare (drop), in (0, 1].
    pub density: f32,
    /// Seed of dare's drop masks and of the randomised SVD (ties, dare).
    pub seed: u64,
}

impl Default for MergeOptions {
    fn default() -> Self {
        MergeOptions { method: Method::Svd, rank: None, weights: None, density: 0.5, seed: 0 }
    }
}

/// What one target's merge achieved.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetReport {
    pub name: String,
    pub rank: usize,
    /// `||reference||_F`, where the reference is the weighted sum of the deltas (cat, svd,
    /// linear) or the dense TIES / DARE matrix (ties, dare).
    pub norm: f64,
    /// `||written delta - reference||_F`: the truncation error of svd/ties/dare (for svd the
    /// exact optimal tail), 0 for cat, the cross terms' effect for linear.
    pub residual: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MergeReport {
    pub method: Method,
    pub targets: Vec<TargetReport>,
}

impl MergeReport {
    /// `sqrt(sum residual^2) / sqrt(sum norm^2)` over all targets (0 for an all-zero reference).
    pub fn relative_error(&self) -> f64 {
        let n2: f64 = self.targets.iter().map(|t| t.norm * t.norm).sum();
        let r2: f64 = self.targets.iter().map(|t| t.residual * t.residual).sum();
        if n2 > 0.0 {
            (r2 / n2).sqrt()
        } else {
            0.0
        }
    }
}

fn label(inputs: &[&LoraAdapter], names: Option<&[String]>, i: usize) -> String {
    match names.and_then(|n| n.get(i)) {
        Some(n) => n.clone(),
        None => match inputs[i].task_name() {
            Some(t) => format!("input #{} (task '{t}')", i + 1),
            None => format!("input #{}", i + 1),
        },
    }
}

/// Checks that `inputs` can be merged or compared: at least one, one architecture, and every
/// target shared by several inputs with the same shape. Errors name the inputs by position.
pub fn check_compatible(inputs: &[&LoraAdapter]) -> Result<()> {
    check_compatible_impl(inputs, None)
}

/// As [`check_compatible`], naming input `i` as `names[i]` (file names, say).
pub fn check_compatible_named(inputs: &[&LoraAdapter], names: &[String]) -> Result<()> {
    check_compatible_impl(inputs, Some(names))
}

fn check_compatible_impl(inputs: &[&LoraAdapter], names: Option<&[String]>) -> Result<()> {
    let Some(first) = inputs.first() else {
        return Err(Error::Usage("no adapters given".into()));
    };
    for (i, a) in inputs.iter().enumerate().skip(1) {
        if a.architecture != first.architecture {
            return Err(Error::Usage(format!(
                "architecture mismatch: {} is for '{}' but {} is for '{}'",
                label(inputs, names, i),
                a.architecture,
                label(inputs, names, 0),
                first.architecture
            )));
        }
    }
    // target -> (first input that has it, n_out, n_in)
    let mut seen: BTreeMap<&str, (usize, usize, usize)> = BTreeMap::new();
    for (i, a) in inputs.iter().enumerate() {
        for (name, t) in &a.targets {
            match seen.get(name.as_str()) {
                None => {
                    seen.insert(name, (i, t.n_out, t.n_in));
                }
                Some(&(j, out, inn)) if (out, inn) != (t.n_out, t.n_in) => {
                    return Err(Error::Usage(format!(
                        "shape mismatch on {name}: {} has {} x {} (out x in) but {} has {out} x {inn}",
                        label(inputs, names, i),
                        t.n_out,
                        t.n_in,
                        label(inputs, names, j)
                    )));
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}

/// Merges `inputs` into one adapter (see the module docs for the operators).
pub fn merge(inputs: &[&LoraAdapter], opts: &MergeOptions) -> Result<LoraAdapter> {
    merge_with_report(inputs, opts).map(|(a, _)| a)
}

/// What `regmean` keeps of the off-diagonal of each task's input Gram (RegMean's
/// "reduce non-diagonal ratio"): ten examples give a few hundred input rows, a Gram of low rank;
/// the diagonal left whole keeps every feature weighted.
pub const REGMEAN_OFF_DIAGONAL: f64 = 0.5;

/// One input adapter's task inputs: the rows its examples give each adapted projection, by
/// target name (`blk.0.attn_q.weight`).
pub type TaskInputs<'a> = BTreeMap<String, InputRows<'a>>;

/// As [`merge_with_report`], with each input's activations (`task_inputs[i]` for `inputs[i]`),
/// which `regmean` weighs the deltas by; a target some input has no rows for is merged by svd.
pub fn merge_with_inputs(inputs: &[&LoraAdapter], task_inputs: &[&TaskInputs<'_>], opts: &MergeOptions) -> Result<(LoraAdapter, MergeReport)> {
    if task_inputs.len() != inputs.len() {
        return Err(Error::Internal(format!("{} activation sets for {} adapters", task_inputs.len(), inputs.len())));
    }
    merge_impl(inputs, Some(task_inputs), opts)
}

/// One part's input rows, as regmean's grouping compares them: (input, address, rows, width).
type RowsKey = (usize, usize, usize, usize);

/// One input's share of one target: delta = `coef * B A`, `coef = w_i * s_i`.
struct Part<'a> {
    input: usize,
    weight: f32,
    coef: f32,
    t: &'a LoraTarget,
}

/// As [`merge`], with the per-target ranks and errors.
pub fn merge_with_report(inputs: &[&LoraAdapter], opts: &MergeOptions) -> Result<(LoraAdapter, MergeReport)> {
    merge_impl(inputs, None, opts)
}

fn merge_impl(inputs: &[&LoraAdapter], task_inputs: Option<&[&TaskInputs<'_>]>, opts: &MergeOptions) -> Result<(LoraAdapter, MergeReport)> {
    check_compatible(inputs)?;
    if opts.method.needs_inputs() && task_inputs.is_none() {
        return Err(Error::Usage(format!(
            "{} weighs each task by the activations of its examples: it is available in `d2c-gguf merge` (with --examples), not here",
            opts.method
        )));
    }
    let n = inputs.len();
    let weights = match &opts.weights {
        Some(w) if w.len() != n => {
            return Err(Error::Usage(format!("{} weights given for {n} adapters (one weight per adapter)", w.len())));
        }
        Some(w) => {
            if let Some(bad) = w.iter().find(|v| !v.is_finite()) {
                return Err(Error::Usage(format!("weight {bad} is not a finite number")));
            }
            w.clone()
        }
        None => vec![1.0 / n as f32; n],
    };
    if opts.method.uses_density() && !(opts.density > 0.0 && opts.density <= 1.0) {
        return Err(Error::Usage(format!("density must be in (0, 1], got {}", opts.density)));
    }
    let rank = opts.rank.unwrap_or_else(|| inputs.iter().map(|a| a.max_rank()).max().unwrap_or(0));
    if opts.method.uses_rank() && rank == 0 {
        return Err(Error::Usage("rank must be at least 1".into()));
    }

    let names: BTreeSet<&String> = inputs.iter().flat_map(|a| a.targets.keys()).collect();
    if opts.method == Method::Linear {
        for name in &names {
            let ranks: BTreeSet<usize> = inputs.iter().filter_map(|a| a.targets.get(*name)).map(|t| t.rank).collect();
            if ranks.len() > 1 {
                return Err(Error::Usage(format!("linear merging needs equal ranks, but {name} has ranks {ranks:?} (use svd or cat)")));
            }
        }
    }
    let wabs: f32 = weights.iter().map(|w| w.abs()).sum();
    let parts_of = |name: &String| -> Vec<Part> {
        inputs
            .iter()
            .enumerate()
            .filter_map(|(i, a)| a.targets.get(name).map(|t| Part { input: i, weight: weights[i], coef: weights[i] * a.scale(t), t }))
            .collect()
    };
    let rows_of = |name: &String, parts: &[Part]| -> Option<Vec<InputRows<'_>>> {
        parts.iter().map(|p| task_inputs.and_then(|ti| ti[p.input].get(name).copied())).collect()
    };
    // Targets that read the same input rows (q, k and v of a block) share regmean's Grams and
    // Cholesky factor, which are most of its cost: each group is merged by one rayon task.
    let groups: Vec<Vec<(&String, Vec<Part>)>> = if opts.method == Method::Regmean {
        // Keyed by each part's input and the address and size of its rows: equal keys mean
        // equal Grams and weights, so the shared results are bitwise those of separate ones.
        let mut by_rows: BTreeMap<Vec<RowsKey>, Vec<(&String, Vec<Part>)>> = BTreeMap::new();
        let mut alone = Vec::new();
        for name in names {
            let parts = parts_of(name);
            match rows_of(name, &parts) {
                Some(rows) => {
                    let key = parts.iter().zip(&rows).map(|(p, x)| (p.input, x.data.as_ptr() as usize, x.rows, x.n_in)).collect();
                    by_rows.entry(key).or_default().push((name, parts));
                }
                None => alone.push(vec![(name, parts)]),
            }
        }
        by_rows.into_values().chain(alone).collect()
    } else {
        names.into_iter().map(|name| vec![(name, parts_of(name))]).collect()
    };
    let results = groups
        .par_iter()
        .map(|group| {
            let mut basis: Option<RegmeanBasis> = None;
            let mut done = Vec::with_capacity(group.len());
            for (name, parts) in group {
                let (target, norm, residual) = match opts.method {
                    Method::Cat => cat_target(parts),
                    Method::Svd => {
                        let (target, norm, residual, _) = svd_target(parts, rank)?;
                        (target, norm, residual)
                    }
                    Method::Linear => linear_target(parts),
                    Method::Regmean => match rows_of(name, parts) {
                        Some(rows) => {
                            if basis.is_none() {
                                basis = Some(regmean_basis(name, parts, &rows)?);
                            }
                            regmean_target(parts, basis.as_ref().expect("set above"), rank)?
                        }
                        None => {
                            let (target, norm, residual, _) = svd_target(parts, rank)?;
                            (target, norm, residual)
                        }
                    },
                    Method::Ties | Method::Dare => dense_target(name, parts, rank, opts, wabs)?,
                };
                let report = TargetReport { name: (*name).clone(), rank: target.rank, norm, residual };
                done.push(((*name).clone(), target, report));
            }
            Ok(done)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut results: Vec<(String, LoraTarget, TargetReport)> = results.into_iter().flatten().collect();
    results.sort_by(|x, y| x.0.cmp(&y.0));

    let mut out = LoraAdapter::new(inputs[0].architecture.clone(), 0.0);
    out.metadata = common_metadata(inputs);
    let mut reports = Vec::with_capacity(results.len());
    for (name, target, report) in results {
        out.targets.insert(name, target);
        reports.push(report);
    }
    let ranks: BTreeSet<usize> = out.targets.values().map(|t| t.rank).collect();
    if ranks.len() == 1 {
        // alpha / r == 1 exactly: the written B A is the delta.
        out.alpha = *ranks.iter().next().unwrap() as f32;
    }
    let report = MergeReport { method: opts.method, targets: reports };

    let md = &mut out.metadata;
    md.insert(KEY_METHOD.into(), Value::String(opts.method.to_string()));
    md.insert(KEY_N_INPUTS.into(), Value::U32(n as u32));
    md.insert(KEY_WEIGHTS.into(), Value::Array(ValueType::F32, weights.iter().map(|w| Value::F32(*w)).collect()));
    if inputs.iter().any(|a| a.task_name().is_some()) {
        let tasks = inputs.iter().map(|a| Value::String(a.task_name().unwrap_or("").to_string())).collect();
        md.insert(KEY_TASKS.into(), Value::Array(ValueType::String, tasks));
    }
    if opts.method.uses_density() {
        md.insert(KEY_DENSITY.into(), Value::F32(opts.density));
        md.insert(KEY_SEED.into(), Value::U64(opts.seed));
    }
    md.insert(KEY_REL_ERROR.into(), Value::F32(report.relative_error() as f32));
    Ok((out, report))
}

/// Metadata every input agrees on (same key, same value), minus earlier merges' records.
fn common_metadata(inputs: &[&LoraAdapter]) -> BTreeMap<String, Value> {
    let mut md = inputs[0].metadata.clone();
    // A task name (or prompt prefix) survives only when all inputs share it.
    md.retain(|k, v| !k.starts_with(KEY_PREFIX) && inputs[1..].iter().all(|a| a.metadata.get(k) == Some(v)));
    md
}

/// Shape of a target (every part has the same, checked by `check_compatible`).
fn shape(parts: &[Part]) -> (usize, usize) {
    (parts[0].t.n_out, parts[0].t.n_in)
}

/// The stacked factors of the exact weighted sum: `B = hstack(coef_i B_i)` (out x R, row-major)
/// and `A = vstack(A_i)` (R x in, row-major).
fn cat_factors(parts: &[Part]) -> (Vec<f32>, Vec<f32>, usize) {
    let (n_out, n_in) = shape(parts);
    let total: usize = parts.iter().map(|p| p.t.rank).sum();
    let mut a = Vec::with_capacity(total * n_in);
    for p in parts {
        a.extend_from_slice(&p.t.a);
    }
    let mut b = vec![0f32; n_out * total];
    let mut off = 0;
    for p in parts {
        let r = p.t.rank;
        for o in 0..n_out {
            let src = &p.t.b[o * r..(o + 1) * r];
            for (d, s) in b[o * total + off..o * total + off + r].iter_mut().zip(src) {
                *d = p.coef * s;
            }
        }
        off += r;
    }
    (b, a, total)
}

fn cat_target(parts: &[Part]) -> (LoraTarget, f64, f64) {
    let (n_out, n_in) = shape(parts);
    let (b, a, r) = cat_factors(parts);
    let norm = linalg::factor_norm2(&b, &a, r, n_in, n_out).max(0.0).sqrt();
    (LoraTarget::new(a, b, r, n_in, n_out), norm, 0.0)
}

/// A single target's delta `scale * B A` cut to its best rank-`rank` approximation (Frobenius,
/// Eckart-Young; what `svd` does to one input), written with scale 1, and the squared singular
/// values of the whole delta (non-increasing), so that callers can see what each rank keeps.
pub fn truncate_target(t: &LoraTarget, scale: f32, rank: usize) -> Result<(LoraTarget, Vec<f64>)> {
    let part = Part { input: 0, weight: 1.0, coef: scale, t };
    let (target, _, _, spectrum) = svd_target(&[part], rank.max(1))?;
    Ok((target, spectrum))
}

/// The svd operator on one target: (target, ||reference||, residual, squared singular values).
fn svd_target(parts: &[Part], rank: usize) -> Result<(LoraTarget, f64, f64, Vec<f64>)> {
    let (n_out, n_in) = shape(parts);
    // Each input's share is c_i B_i A_i; split c_i so that both stacked factors have comparable
    // norms (nothing changes mathematically; the Gram matrices stay well scaled). Inputs whose
    // share is zero are left out so that they cannot make the Gram matrix singular.
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>().sqrt();
    let shares: Vec<(&Part, f64, f64)> = parts
        .iter()
        .filter_map(|p| {
            let (nb, na) = (norm(&p.t.b) * (p.coef as f64).abs(), norm(&p.t.a));
            (nb > 0.0 && na > 0.0).then(|| {
                let g = (na / nb).sqrt();
                (p, p.coef as f64 * g, 1.0 / g)
            })
        })
        .collect();
    let total: usize = shares.iter().map(|(p, _, _)| p.t.rank).sum();
    // Stacked B^T (R x out: column o is row o of every c_i B_i, side by side) and stacked A^T
    // (in x R), column-major f64, both filled by contiguous copies.
    let mut bst = Mat::<f64>::zeros(total, n_out);
    let mut ats = Mat::<f64>::zeros(n_in, total);
    for o in 0..n_out {
        let col = bst.col_mut(o).try_as_col_major_mut().unwrap().as_slice_mut();
        let mut off = 0;
        for (p, cb, _) in &shares {
            let r = p.t.rank;
            for (d, x) in col[off..off + r].iter_mut().zip(&p.t.b[o * r..(o + 1) * r]) {
                *d = cb * *x as f64;
            }
            off += r;
        }
    }
    let mut off = 0;
    for (p, _, ca) in &shares {
        for k in 0..p.t.rank {
            let col = ats.col_mut(off + k).try_as_col_major_mut().unwrap().as_slice_mut();
            for (d, x) in col.iter_mut().zip(&p.t.a[k * n_in..(k + 1) * n_in]) {
                *d = ca * *x as f64;
            }
        }
        off += p.t.rank;
    }
    // QR of the stacked B through its Gram matrix: B = Q L^T with L = chol(B^T B) and
    // Q = B L^{-T} orthonormal, never formed. Then delta = B A = Q C with C = L^T A, so the
    // singular values and left vectors of delta are those of C, whose small R x R Gram matrix
    // H = C C^T = L^T (A A^T) L gives them: H = U diag(sigma^2) U^T. All in f64 from f32
    // data: the Gram route squares condition numbers, which costs nothing visible at f32 output
    // precision for singular values down to ~1e-6 of the largest.
    let gb = linalg::gram(bst.transpose(), Par::Seq);
    let ga = linalg::gram(ats.as_ref(), Par::Seq);
    let max_diag = (0..total).map(|i| gb[(i, i)]).fold(0.0, f64::max);
    let l = linalg::cholesky_psd(gb, (max_diag * 1e-13).max(f64::MIN_POSITIVE), Par::Seq)?;
    let h = linalg::lower_t_mul(l.as_ref(), linalg::mul(ga.as_ref(), l.as_ref(), Par::Seq).as_ref(), Par::Seq);
    let (lambda, u) = linalg::symmetric_eigen(h.as_ref(), Par::Seq)?;
    let lambda: Vec<f64> = lambda.into_iter().map(|v| v.max(0.0)).collect();
    let norm2: f64 = lambda.iter().sum();
    let top = lambda.first().copied().unwrap_or(0.0);
    // Directions below 1e-6 of the top singular value are numerically absent: dropping them
    // keeps L^{-T} from amplifying rounding noise.
    let keep = lambda.iter().take(rank).take_while(|&&v| v > top * 1e-12 && v > 0.0).count();
    let tail2: f64 = lambda[keep..].iter().sum();
    if keep == 0 {
        // An all-zero delta: one zero component keeps the target (and the file) well-formed.
        return Ok((LoraTarget::new(vec![0.0; n_in], vec![0.0; n_out], 1, n_in, n_out), 0.0, 0.0, lambda));
    }
    // B' = B L^{-T} U_k sigma^{1/2} and A'^T = A^T L U_k sigma^{-1/2}, so that
    // B' A' = Q U_k U_k^T Q^T delta: the projection of delta on its top-k left singular vectors.
    let mut tb = Mat::from_fn(total, keep, |i, j| u[(i, j)] * lambda[j].powf(0.25));
    linalg::solve_lower_t_in_place(l.as_ref(), tb.as_mut(), Par::Seq);
    let ta = linalg::lower_mul(l.as_ref(), Mat::from_fn(total, keep, |i, j| u[(i, j)] / lambda[j].powf(0.25)).as_ref(), Par::Seq);
    // Column-major B'^T (keep x out) and A'^T (in x keep) are the row-major B' and A'.
    let bo = linalg::mul(tb.transpose(), bst.as_ref(), Par::Seq);
    let ao = linalg::mul(ats.as_ref(), ta.as_ref(), Par::Seq);
    let (b, a) = (columns_f32(&bo), columns_f32(&ao));
    Ok((LoraTarget::new(a, b, keep, n_in, n_out), norm2.sqrt(), tail2.sqrt(), lambda))
}

/// A column-major matrix's columns one after another, in f32: the row-major form of its
/// transpose (how a factor's `A^T` or `B'^T` becomes the stored `A` or `B'`).
fn columns_f32(m: &Mat<f64>) -> Vec<f32> {
    (0..m.ncols()).flat_map(|j| m.col(j).try_as_col_major().unwrap().as_slice().iter().map(|v| *v as f32)).collect()
}

/// What regmean needs of a target's inputs alone: each part's scaled Gram `G_k` and the
/// Cholesky factor `L` of `H = sum |w_k| G_k`. Targets whose parts read the same rows with the
/// same weights share it.
struct RegmeanBasis {
    grams: Vec<Mat<f64>>,
    l: Mat<f64>,
}

/// `rows[k]` are part k's task inputs.
fn regmean_basis(name: &str, parts: &[Part], rows: &[InputRows]) -> Result<RegmeanBasis> {
    let (_, n_in) = shape(parts);
    let mut grams = Vec::with_capacity(parts.len());
    let mut h = Mat::<f64>::zeros(n_in, n_in);
    for (p, x) in parts.iter().zip(rows) {
        if x.n_in != n_in || x.rows == 0 || x.data.len() != x.rows * n_in {
            return Err(Error::Internal(format!("{name}: {} input rows of width {} for a target {n_in} wide", x.rows, x.n_in)));
        }
        let xm = Mat::<f64>::from_fn(x.rows, n_in, |r, c| x.data[r * n_in + c] as f64);
        // Per row, so that a task with longer prompts does not outweigh the others.
        let mut g = linalg::gram(xm.as_ref(), Par::Seq);
        let per_row = 1.0 / x.rows as f64;
        let w = p.weight.abs() as f64;
        for j in 0..n_in {
            for i in 0..n_in {
                g[(i, j)] *= if i == j { per_row } else { per_row * REGMEAN_OFF_DIAGONAL };
                h[(i, j)] += w * g[(i, j)];
            }
        }
        grams.push(g);
    }
    let mean_diag = (0..n_in).map(|i| h[(i, i)]).sum::<f64>() / n_in as f64;
    let l = linalg::cholesky_psd(h, (mean_diag * 1e-6).max(f64::MIN_POSITIVE), Par::Seq)?;
    Ok(RegmeanBasis { grams, l })
}

/// The regmean operator on one target (module docs), on its parts' [`RegmeanBasis`]. Norm and
/// residual are measured in the inputs' norm (`|| . L||_F`).
fn regmean_target(parts: &[Part], basis: &RegmeanBasis, rank: usize) -> Result<(LoraTarget, f64, f64)> {
    let (n_out, n_in) = shape(parts);
    let wsum: f64 = parts.iter().map(|p| p.weight.abs() as f64).sum();
    let (grams, l) = (&basis.grams, &basis.l);
    // Part k in the whitened space: B_k (A_k G_k L^{-T}); its A^T is L^{-1} G_k A_k^T.
    let whitened: Vec<LoraTarget> = parts
        .iter()
        .zip(grams)
        .map(|(p, g)| {
            let r = p.t.rank;
            let at = Mat::<f64>::from_fn(n_in, r, |i, k| p.t.a[k * n_in + i] as f64);
            let mut y = linalg::mul(g.as_ref(), at.as_ref(), Par::Seq);
            linalg::solve_lower_in_place(l.as_ref(), y.as_mut(), Par::Seq);
            LoraTarget::new(columns_f32(&y), p.t.b.clone(), r, n_in, n_out)
        })
        .collect();
    let moved: Vec<Part> =
        parts.iter().zip(&whitened).map(|(p, t)| Part { input: p.input, weight: p.weight, coef: (p.coef as f64 * wsum) as f32, t }).collect();
    let (cut, norm, residual, _) = svd_target(&moved, rank)?;
    // Back from the whitened space: A <- A L^{-1}, i.e. A^T <- L^{-T} A^T.
    let k = cut.rank;
    let mut at = Mat::<f64>::from_fn(n_in, k, |i, j| cut.a[j * n_in + i] as f64);
    linalg::solve_lower_t_in_place(l.as_ref(), at.as_mut(), Par::Seq);
    Ok((LoraTarget::new(columns_f32(&at), cut.b, k, n_in, n_out), norm, residual))
}

fn linear_target(parts: &[Part]) -> (LoraTarget, f64, f64) {
    let (n_out, n_in) = shape(parts);
    let r = parts[0].t.rank;
    let mut a = vec![0f32; r * n_in];
    let mut b = vec![0f32; n_out * r];
    for p in parts {
        // PEFT: sqrt(|w s|) on both factors, the sign on A.
        let m = p.coef.abs().sqrt();
        let ma = m.copysign(p.coef);
        a.iter_mut().zip(&p.t.a).for_each(|(d, s)| *d += ma * s);
        b.iter_mut().zip(&p.t.b).for_each(|(d, s)| *d += m * s);
    }
    // Distance to the weighted sum, in factor space.
    let (cb, ca, cr) = cat_factors(parts);
    let ref2 = linalg::factor_norm2(&cb, &ca, cr, n_in, n_out);
    let out2 = linalg::factor_norm2(&b, &a, r, n_in, n_out);
    let cross = linalg::factor_inner(&cb, &ca, cr, &b, &a, r, n_in, n_out);
    let residual = (ref2 - 2.0 * cross + out2).max(0.0).sqrt();
    (LoraTarget::new(a, b, r, n_in, n_out), ref2.max(0.0).sqrt(), residual)
}

/// Dense `coef * B A` (out x in, row-major).
fn dense_delta(p: &Part) -> Vec<f32> {
    let t = p.t;
    let mut out = vec![0f32; t.n_out * t.n_in];
    if t.rank > 0 {
        // Row-major out x in is column-major in x out = A^T B^T.
        let dst = faer::MatMut::from_column_major_slice_mut(&mut out, t.n_in, t.n_out);
        faer::linalg::matmul::matmul(
            dst,
            faer::Accum::Replace,
            linalg::view_t(&t.a, t.rank, t.n_in),
            linalg::view_t(&t.b, t.n_out, t.rank),
            p.coef,
            Par::Seq,
        );
    }
    out
}

fn dense_target(name: &str, parts: &[Part], rank: usize, opts: &MergeOptions, wabs: f32) -> Result<(LoraTarget, f64, f64)> {
    let (n_out, n_in) = shape(parts);
    let seed = target_seed(opts.seed, name);
    let len = n_out * n_in;
    let dense = match opts.method {
        Method::Ties => ties_stream(len, parts.len(), |k| (parts[k].weight, dense_delta(&parts[k])), opts.density, wabs),
        Method::Dare => dare_stream(len, parts.len(), |k| (parts[k].input, dense_delta(&parts[k])), opts.density, seed),
        m => unreachable!("{m} is not a dense method"),
    };
    let lr = low_rank(&dense, n_out, n_in, rank, seed)?;
    Ok((LoraTarget::new(lr.a, lr.b, lr.rank, n_in, n_out), lr.norm, lr.residual))
}

/// Keeps the `floor(density * len)` entries of largest magnitude (ties broken by position),
/// zeroes the rest; `density >= 1` keeps all.
pub fn trim_top(v: &mut [f32], density: f32) {
    let len = v.len();
    let k = ((density as f64) * len as f64) as usize;
    if k >= len {
        return;
    }
    if k == 0 {
        v.fill(0.0);
        return;
    }
    let mut mags: Vec<f32> = v.iter().map(|x| x.abs()).collect();
    // The k-th largest magnitude.
    let (_, thr, _) = mags.select_nth_unstable_by(len - k, |a, b| a.total_cmp(b));
    let thr = *thr;
    drop(mags);
    let above = v.iter().filter(|x| x.abs() > thr).count();
    let mut equal_left = k - above;
    for x in v.iter_mut() {
        let m = x.abs();
        if m > thr {
            continue;
        }
        if m == thr && equal_left > 0 {
            equal_left -= 1;
            continue;
        }
        *x = 0.0;
    }
}

/// TIES on dense task vectors: `deltas[i]` is input i's delta (its scale included), `weights[i]`
/// its weight. Each `w_i * delta_i` is trimmed to the `density` fraction of its largest entries;
/// each entry's sign is elected by the sum of the trimmed weighted deltas (ties go to +); the
/// entries that agree with it are averaged with weights `|w_i|`, and the result is scaled by
/// `sum |w_i|` (so weights `1 / N`, the default, give the paper's disjoint mean, lambda = 1).
pub fn ties_dense(deltas: &[&[f32]], weights: &[f32], density: f32) -> Vec<f32> {
    assert_eq!(deltas.len(), weights.len());
    let len = deltas.first().map_or(0, |d| d.len());
    let wabs = weights.iter().map(|w| w.abs()).sum();
    ties_stream(len, deltas.len(), |k| (weights[k], deltas[k].iter().map(|x| x * weights[k]).collect()), density, wabs)
}

/// TIES in two passes over the inputs, holding four dense matrices whatever their number.
/// `make(k)` returns input k's weight and its weighted delta `w_k * delta_k`.
fn ties_stream(len: usize, n: usize, make: impl Fn(usize) -> (f32, Vec<f32>), density: f32, wabs: f32) -> Vec<f32> {
    // Pass 1: elect signs from the sum of trimmed weighted deltas.
    let mut sign = vec![0f32; len];
    for k in 0..n {
        let (_, mut u) = make(k);
        trim_top(&mut u, density);
        sign.iter_mut().zip(&u).for_each(|(s, x)| *s += x);
    }
    sign.iter_mut().for_each(|s| *s = if *s >= 0.0 { 1.0 } else { -1.0 });
    // Pass 2: average the agreeing entries.
    let mut num = vec![0f32; len];
    let mut den = vec![0f32; len];
    for k in 0..n {
        let (w, mut u) = make(k);
        trim_top(&mut u, density);
        for ((x, s), (nu, de)) in u.iter().zip(&sign).zip(num.iter_mut().zip(den.iter_mut())) {
            if *x != 0.0 && (*x > 0.0) == (*s > 0.0) {
                *nu += x;
                *de += w.abs();
            }
        }
    }
    for (nu, de) in num.iter_mut().zip(&den) {
        *nu = if *de > 0.0 { *nu / de * wabs } else { 0.0 };
    }
    num
}

/// DARE on dense task vectors: input i keeps each entry of `w_i * delta_i` with probability
/// `density` (its own seeded stream, from `seed` and i) and rescales the kept ones by
/// `1 / density`; the results are summed.
pub fn dare_dense(deltas: &[&[f32]], weights: &[f32], density: f32, seed: u64) -> Vec<f32> {
    assert_eq!(deltas.len(), weights.len());
    let len = deltas.first().map_or(0, |d| d.len());
    dare_stream(len, deltas.len(), |k| (k, deltas[k].iter().map(|x| x * weights[k]).collect()), density, seed)
}

/// `make(k)` returns (input index for the mask's seed, weighted delta).
fn dare_stream(len: usize, n: usize, make: impl Fn(usize) -> (usize, Vec<f32>), density: f32, seed: u64) -> Vec<f32> {
    let mut sum = vec![0f32; len];
    let rescale = 1.0 / density;
    for k in 0..n {
        let (input, u) = make(k);
        let mut rng = ChaCha8Rng::seed_from_u64(splitmix(seed ^ splitmix(input as u64 + 1)));
        for (s, x) in sum.iter_mut().zip(&u) {
            if rng.random::<f32>() < density {
                *s += x * rescale;
            }
        }
    }
    sum
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A per-target seed, so results do not depend on the order targets are processed in.
fn target_seed(seed: u64, name: &str) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.update(name.as_bytes());
    u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().unwrap())
}

/// A rank-`rank` approximation of a dense matrix, with its measured error.
#[derive(Debug, Clone)]
pub struct LowRank {
    pub rank: usize,
    /// out x rank, row-major.
    pub b: Vec<f32>,
    /// rank x in, row-major.
    pub a: Vec<f32>,
    /// `||M||_F`.
    pub norm: f64,
    /// `||M - B A||_F`.
    pub residual: f64,
}

/// Truncated SVD of the row-major `n_out x n_in` matrix `m`, to `rank` (or less when the matrix
/// is smaller). Small matrices get an exact SVD; larger ones a randomised range finder (Halko,
/// Martinsson & Tropp 2011: oversampling `max(10, rank)`, two power iterations, re-orthonormalised
/// each time). The residual is measured exactly either way: `||M||^2 - sum of the kept s^2`,
/// since `B A` is the orthogonal projection of `M` onto the kept left singular vectors.
pub fn low_rank(m: &[f32], n_out: usize, n_in: usize, rank: usize, seed: u64) -> Result<LowRank> {
    assert_eq!(m.len(), n_out * n_in);
    let norm2: f64 = m.iter().map(|x| (*x as f64) * (*x as f64)).sum();
    // Work on X = M^T (in x out), the column-major view of the row-major M.
    let x = linalg::view_t(m, n_out, n_in);
    let small = n_out.min(n_in);
    let k = (rank + rank.max(10)).min(small);
    // U_x (in x keep), s, V_x (out x keep) with X ~ U_x diag(s) V_x^T, i.e. M ~ V_x diag(s) U_x^T.
    let (ux, s, vx) = if small <= 64 || 3 * k >= small {
        let x64 = Mat::from_fn(n_in, n_out, |i, j| x[(i, j)] as f64);
        let svd = linalg::thin_svd(x64.as_ref(), Par::Seq)?;
        (svd.u, svd.s, svd.v)
    } else {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let omega = Mat::<f32>::from_fn(n_out, k, |_, _| d2c_format::synth::normal(&mut rng));
        let mut q = linalg::orthonormal_basis(linalg::mul(x, omega.as_ref(), Par::Seq), Par::Seq);
        for _ in 0..2 {
            let z = linalg::orthonormal_basis(linalg::mul(x.transpose(), q.as_ref(), Par::Seq), Par::Seq);
            q = linalg::orthonormal_basis(linalg::mul(x, z.as_ref(), Par::Seq), Par::Seq);
        }
        let small_b = linalg::mul(q.transpose(), x, Par::Seq); // k x out
        let b64 = Mat::from_fn(small_b.nrows(), small_b.ncols(), |i, j| small_b[(i, j)] as f64);
        let svd = linalg::thin_svd(b64.as_ref(), Par::Seq)?;
        let q64 = Mat::from_fn(q.nrows(), q.ncols(), |i, j| q[(i, j)] as f64);
        (linalg::mul(q64.as_ref(), svd.u.as_ref(), Par::Seq), svd.s, svd.v)
    };
    let keep = rank.min(s.len());
    let kept2: f64 = s[..keep].iter().map(|v| v * v).sum();
    let mut b = vec![0f32; n_out * keep];
    let mut a = vec![0f32; keep * n_in];
    for j in 0..keep {
        let r = s[j].sqrt();
        for o in 0..n_out {
            b[o * keep + j] = (vx[(o, j)] * r) as f32;
        }
        for i in 0..n_in {
            a[j * n_in + i] = (ux[(i, j)] * r) as f32;
        }
    }
    Ok(LowRank { rank: keep, b, a, norm: norm2.sqrt(), residual: (norm2 - kept2).max(0.0).sqrt() })
}
