//! The judging rule, in one place: whether a tensor our implementation produced matches the float64
//! reference. `cases/README.md` gives the rule and the measurements behind it. For every tensor:
//!
//! ```text
//! scale     = max(||want||, tol * ||layer||)   a tensor is never measured against less than the
//!                                             tolerance's share of its layer: a gradient that is
//!                                             zero in float64 is judged against its layer
//! error     = ||got - want|| / scale
//! sigma     = what moving every input by one ulp does to our result, / scale: the smallest over
//!             SENSITIVITY_PATTERNS random sign patterns, each +1 and -1 ulp (a run that also
//!             crosses a ReLU or max-pool decision moves more; the smallest is the smooth part)
//! allowed   = tol                             while CONDITIONING_FACTOR * sigma <= tol
//!           = CONDITIONING_FACTOR * sigma     while sigma < UNDETERMINED
//!           = UNDETERMINED_ALLOWED            otherwise: float32 does not determine the tensor,
//!                                             only its size and direction are checked
//! pass      = error <= allowed, or
//!             a float32 decision: for the inputs moved by +-1 ulp, or by +-DECISION_ULPS in
//!             DECISION_PATTERNS patterns, our result is within `allowed` of the reference. A ReLU
//!             input or max-pool tie within float32 rounding of its threshold that float32
//!             arithmetic decided the other way than float64 is decided back by such a move; the
//!             move's own effect must fit in `allowed` too, so no error beyond `allowed` that
//!             the same code makes on every input (a bug) passes this way
//! ```
//!
//! `tol` is the README's tolerance of the tensor's [`Class`]; `||layer||` is the norm of the
//! reference tensors of the same module and role (the parameter gradients of `projection_head.0`,
//! say). Norms are L2 over every element, in f64; NaN, infinities and shape mismatches fail.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// One ulp of every input, in this many pseudo-random sign patterns (each both ways), measures the
/// smooth float32 conditioning of each tensor (the case's own storage rounded its inputs by at most
/// half an ulp). In a large network some of these runs also cross a decision; the smallest effect
/// over the runs is taken.
pub const SENSITIVITY_PATTERNS: u64 = 2;

/// The witness runs for float32 decisions move every input by this many ulps: float32 arithmetic
/// moves a pre-activation by more than one ulp of input does (one ulp does not decide back the ReLU
/// that float32 flips in the shared ResNet-18 case, eight do; cases/README.md).
pub const DECISION_ULPS: i64 = 8;

/// Sign patterns of the witness runs, each both ways, so that a decision within reach is crossed
/// the other way by one of the two.
pub const DECISION_PATTERNS: u64 = 2;

/// How much larger than one ulp's effect an error may be: float32 arithmetic rounds like a few ulps
/// of input, and sigma is a random sample, not a bound.
pub const CONDITIONING_FACTOR: f64 = 3.0;

/// Sensitivity from which float32 does not determine a tensor: one ulp of input moves it by 5% or
/// more. Such a tensor is mostly rounding noise (the LARC update of a bias whose gradient is zero in
/// float64: sigma 0.12 - 0.26); PyTorch's own float32 run misses those by 18 - 62%.
pub const UNDETERMINED: f64 = 0.05;

/// The error allowed to an undetermined tensor: less than the tensor itself, i.e. ours is nearer
/// the reference than zero is (right size, right direction).
pub const UNDETERMINED_ALLOWED: f64 = 1.0;

/// What a tensor is, which sets its tolerance (the reference README's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Sinkhorn codes of a `sinkhorn` case.
    Sinkhorn,
    /// Forward values: losses, scores, embeddings, features, codes, running statistics, the queue.
    Value,
    /// Parameter gradients.
    Gradient,
    /// What whole iterations did to a weight or buffer (final - initial), and SGD momentum buffers.
    Update,
}

impl Class {
    /// The README's relative L2 tolerance for the class.
    pub fn tolerance(self) -> f64 {
        match self {
            Class::Sinkhorn => 1e-5,
            Class::Value => 1e-4,
            Class::Gradient | Class::Update => 1e-3,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Class::Sinkhorn => "sinkhorn",
            Class::Value => "value",
            Class::Gradient => "gradient",
            Class::Update => "update",
        }
    }
}

/// What a checked tensor is compared with.
#[derive(Clone, Debug, PartialEq)]
pub enum Want {
    /// The case's tensor of the output's name.
    Tensor,
    /// `expect - initial` (both tensors of the case): the output is an update, final - initial.
    Update {
        /// The case's tensor of the value before the first iteration (`param.<name>`).
        initial: String,
    },
    /// The case has no such tensor, and must not have: ours exists where PyTorch's does not (a
    /// momentum buffer for a parameter that never had a gradient).
    Absent,
}

/// One tensor produced by our implementation, to be judged.
#[derive(Clone, Debug)]
pub struct Output {
    /// The name of the case's tensor it is compared with (`expect.grad.conv1.weight`).
    pub name: String,
    /// Our values in the reference's layout; `None` when our run has no such tensor.
    pub got: Option<Vec<f64>>,
    /// What our values are compared with.
    pub want: Want,
    /// What the tensor is, which sets its README tolerance.
    pub class: Class,
    /// The layer and role it belongs to (`expect.grad.layer1.0.bn1`), whose reference norm is the
    /// smallest scale it is measured against; `None` for tensors that stand alone (a loss).
    pub layer: Option<String>,
}

impl Output {
    /// A tensor compared with the case's tensor of the same name, on its own.
    pub fn value<T: Into<f64>>(name: impl Into<String>, got: impl IntoIterator<Item = T>, class: Class) -> Output {
        Output {
            name: name.into(),
            got: Some(got.into_iter().map(Into::into).collect()),
            want: Want::Tensor,
            class,
            layer: None,
        }
    }

    /// A tensor of a layer (parameter, gradient, statistic): also measured against the layer.
    pub fn in_layer(mut self, layer: impl Into<String>) -> Output {
        self.layer = Some(layer.into());
        self
    }
}

/// The layer group of a parameter or buffer name under a prefix: `expect.grad.` +
/// `layer1.0.bn1.weight` -> `expect.grad.layer1.0.bn1`, with `role` (parameters / statistics) so
/// that a layer's running statistics do not set the scale of its weights.
pub fn layer_of(prefix: &str, name: &str, role: &str) -> String {
    let module = name.rsplit_once('.').map_or("", |(m, _)| m);
    format!("{prefix}{module} ({role})")
}

/// Where a check's allowed error comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allowance {
    /// The README's tolerance of the class.
    Readme,
    /// [`CONDITIONING_FACTOR`] times the measured sensitivity, above the README's tolerance.
    Conditioned,
    /// [`UNDETERMINED_ALLOWED`]: the sensitivity reached [`UNDETERMINED`].
    Undetermined,
}

/// A perturbed run whose result is within its allowance of the reference although the run on the
/// case's own inputs is not: float32 decided a threshold the other way than float64.
#[derive(Clone, Debug, PartialEq)]
pub struct Witness {
    /// How far, in ulps, the run moved every input, and with which sign pattern.
    pub ulps: i64,
    /// The sign pattern of the run.
    pub pattern: u64,
    /// Its error against the reference (same scale as the check's), within the check's tolerance.
    pub error: f64,
}

/// Why a tensor was judged as it was.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    /// What the tensor is, which sets the README tolerance.
    pub class: Class,
    /// Set when the reference tensor is negligible within its layer, so that the layer's norm times
    /// the tolerance set the scale: the layer and its reference norm.
    pub layer_scale: Option<(String, f64)>,
    /// sigma: the effect of one ulp of every input, relative to the scale (0 when not measured).
    pub sensitivity: f64,
    /// Where the allowed error comes from.
    pub allowance: Allowance,
    /// The perturbed run that passes when the case's own inputs do not.
    pub witness: Option<Witness>,
    /// A structural failure (a tensor missing on one side), when there is one.
    pub note: Option<&'static str>,
}

/// One judged tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Check {
    /// The case's tensor (`expect.grad.conv1.weight`).
    pub name: String,
    /// `||got - want|| / scale` on the case's own inputs; infinite when the shapes differ or a
    /// value is not finite.
    pub error: f64,
    /// The error allowed on the case's own inputs.
    pub tolerance: f64,
    /// How the tolerance and the scale were chosen.
    pub rule: Rule,
}

impl Check {
    /// Within the tolerance, or a float32 decision witnessed by a perturbed run.
    pub fn pass(&self) -> bool {
        self.error <= self.tolerance || self.rule.witness.is_some()
    }
}

impl fmt::Display for Rule {
    /// `gradient 1e-3 relative`, `gradient 1e-3 against layer expect.grad.x (parameters) (norm
    /// 1.3e1)`, `..., float32 conditioning 3 x 7.2e-4`, `..., undetermined in float32 (...)`,
    /// `..., float32 decision: inputs moved +8 ulps (pattern 1) give 2.1e-5`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(note) = self.note {
            return write!(f, "{note}");
        }
        write!(f, "{} {:.0e} ", self.class.name(), self.class.tolerance())?;
        match &self.layer_scale {
            Some((layer, norm)) => write!(f, "against layer {layer} (norm {norm:.2e})")?,
            None => write!(f, "relative")?,
        }
        match self.allowance {
            Allowance::Readme => {}
            Allowance::Conditioned => {
                write!(f, ", float32 conditioning {CONDITIONING_FACTOR} x {:.2e}/ulp", self.sensitivity)?
            }
            Allowance::Undetermined => write!(
                f,
                ", undetermined in float32 (one ulp of input moves it {:.2e}): size and direction only",
                self.sensitivity
            )?,
        }
        if let Some(w) = &self.witness {
            write!(
                f,
                ", float32 decision: inputs moved {:+} ulps (pattern {}) give {:.2e}",
                w.ulps, w.pattern, w.error
            )?;
        }
        Ok(())
    }
}

/// The reference side of the comparison, from the case's tensors.
pub trait Reference {
    /// The case's tensor `name` as f64, if it has one.
    fn tensor(&self, name: &str) -> Option<Vec<f64>>;
}

/// Our outputs for the case's inputs moved by `ulps` in sign pattern `pattern`.
#[derive(Clone, Debug)]
pub struct Rerun {
    /// How far every input was moved (+-1: sensitivity runs; +-[`DECISION_ULPS`]: witness runs).
    pub ulps: i64,
    /// The sign pattern; `+ulps` and `-ulps` of one pattern move every input opposite ways.
    pub pattern: u64,
    /// What our implementation produced.
    pub outputs: Vec<Output>,
}

/// The perturbed runs the rule needs, as `(ulps, pattern)`.
pub fn reruns() -> Vec<(i64, u64)> {
    let pairs = |ulps: i64, patterns: u64| (0..patterns).flat_map(move |p| [(ulps, p), (-ulps, p)]);
    pairs(1, SENSITIVITY_PATTERNS).chain(pairs(DECISION_ULPS, DECISION_PATTERNS)).collect()
}

/// Judges our outputs on the case's inputs (`outputs`) against the case (`reference`), with our
/// outputs on the perturbed inputs of [`reruns`]. A missing reference tensor is an unusable case
/// (returned as the error's name), not a failed check.
pub fn judge(outputs: &[Output], reruns: &[Rerun], reference: &impl Reference) -> Result<Vec<Check>, String> {
    // The reference values, and the norm of every layer's reference tensors.
    let mut wants = Vec::with_capacity(outputs.len());
    let mut layer_sq: BTreeMap<&str, f64> = BTreeMap::new();
    for o in outputs {
        let want = match &o.want {
            Want::Tensor => Some(reference.tensor(&o.name).ok_or_else(|| o.name.clone())?),
            Want::Update { initial } => {
                let fin = reference.tensor(&o.name).ok_or_else(|| o.name.clone())?;
                let init = reference.tensor(initial).ok_or_else(|| initial.clone())?;
                if fin.len() != init.len() {
                    return Err(format!("{} (its shape differs from {initial})", o.name));
                }
                Some(fin.iter().zip(&init).map(|(f, i)| f - i).collect::<Vec<f64>>())
            }
            Want::Absent => None,
        };
        if let (Some(layer), Some(w)) = (&o.layer, &want) {
            *layer_sq.entry(layer).or_default() += sum_sq(w);
        }
        wants.push(want);
    }
    let by_name: Vec<HashMap<&str, &Output>> =
        reruns.iter().map(|r| r.outputs.iter().map(|o| (o.name.as_str(), o)).collect()).collect();
    let values = |run: usize, name: &str, len: usize| -> Option<&Vec<f64>> {
        by_name[run].get(name).and_then(|o| o.got.as_ref()).filter(|v| v.len() == len)
    };

    let mut checks = Vec::with_capacity(outputs.len());
    for (o, want) in outputs.iter().zip(&wants) {
        let tol = o.class.tolerance();
        let mut rule = Rule {
            class: o.class,
            layer_scale: None,
            sensitivity: 0.0,
            allowance: Allowance::Readme,
            witness: None,
            note: None,
        };
        let (got, want) = match (&o.got, want) {
            (Some(g), Some(w)) => (g, w),
            (None, _) => {
                rule.note = Some("missing from our run (the case has it)");
                checks.push(Check { name: o.name.clone(), error: f64::INFINITY, tolerance: tol, rule });
                continue;
            }
            (Some(_), None) => {
                rule.note = Some("our run has it, PyTorch's does not");
                checks.push(Check { name: o.name.clone(), error: f64::INFINITY, tolerance: tol, rule });
                continue;
            }
        };
        let own = sum_sq(want).sqrt();
        let layer_norm = o.layer.as_deref().and_then(|l| layer_sq.get(l)).map_or(0.0, |s| s.sqrt());
        let mut scale = own;
        if tol * layer_norm > own {
            scale = tol * layer_norm;
            rule.layer_scale = o.layer.clone().map(|l| (l, layer_norm));
        }
        let error = distance(got, want, scale);

        // sigma: the smallest effect of the one-ulp runs (a run that also crosses a decision moves
        // the tensor by more than one ulp's smooth effect; the smallest is the cleanest).
        rule.sensitivity = reruns
            .iter()
            .enumerate()
            .filter(|(_, r)| r.ulps.abs() == 1)
            .filter_map(|(i, _)| values(i, &o.name, got.len()).map(|p| distance(p, got, scale)))
            .fold(f64::INFINITY, f64::min);
        if !rule.sensitivity.is_finite() {
            rule.sensitivity = 0.0;
        }
        let sigma = rule.sensitivity;
        let tolerance = if sigma >= UNDETERMINED {
            rule.allowance = Allowance::Undetermined;
            UNDETERMINED_ALLOWED
        } else if CONDITIONING_FACTOR * sigma > tol {
            rule.allowance = Allowance::Conditioned;
            CONDITIONING_FACTOR * sigma
        } else {
            tol
        };
        let within = error <= tolerance; // false for NaN
        if !within {
            // A float32 decision: a perturbed run that lands within the same tolerance.
            rule.witness = reruns
                .iter()
                .enumerate()
                .filter_map(|(i, r)| {
                    let e = distance(values(i, &o.name, got.len())?, want, scale);
                    (e <= tolerance).then_some(Witness { ulps: r.ulps, pattern: r.pattern, error: e })
                })
                .min_by(|a, b| a.error.total_cmp(&b.error));
        }
        checks.push(Check { name: o.name.clone(), error, tolerance, rule });
    }
    Ok(checks)
}

fn sum_sq(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum()
}

/// `||a - b|| / scale`; infinite on a length mismatch or a non-finite value of `a`; the bare
/// distance when `scale` is 0 (a reference and layer that are exactly zero).
fn distance(a: &[f64], b: &[f64], scale: f64) -> f64 {
    if a.len() != b.len() || a.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let d: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>().sqrt();
    if scale > 0.0 {
        d / scale
    } else {
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Map(HashMap<String, Vec<f64>>);
    impl Reference for Map {
        fn tensor(&self, name: &str) -> Option<Vec<f64>> {
            self.0.get(name).cloned()
        }
    }

    fn reference(entries: &[(&str, Vec<f64>)]) -> Map {
        Map(entries.iter().map(|(k, v)| (k.to_string(), v.clone())).collect())
    }

    fn grad(name: &str, got: Vec<f64>) -> Output {
        Output {
            name: format!("expect.grad.fc.{name}"),
            got: Some(got),
            want: Want::Tensor,
            class: Class::Gradient,
            layer: Some(layer_of("expect.grad.", &format!("fc.{name}"), "parameters")),
        }
    }

    /// Reruns of a single output: `(ulps, pattern, values)`.
    fn reruns_of(o: &Output, runs: &[(i64, u64, Vec<f64>)]) -> Vec<Rerun> {
        runs.iter()
            .map(|(ulps, pattern, v)| Rerun {
                ulps: *ulps,
                pattern: *pattern,
                outputs: vec![Output { got: Some(v.clone()), ..o.clone() }],
            })
            .collect()
    }

    fn judge_one(o: &Output, runs: &[(i64, u64, Vec<f64>)], want: &Map) -> Result<Check, String> {
        judge(std::slice::from_ref(o), &reruns_of(o, runs), want).map(|mut c| c.remove(0))
    }

    /// A weight gradient of norm 5 and a bias gradient that is zero in float64.
    fn layer() -> Map {
        reference(&[("expect.grad.fc.weight", vec![3.0, 4.0]), ("expect.grad.fc.bias", vec![1e-16, -1e-16])])
    }

    fn find<'a>(checks: &'a [Check], name: &str) -> &'a Check {
        checks.iter().find(|c| c.name.ends_with(name)).unwrap()
    }

    #[test]
    fn relative_error_against_the_tolerance() {
        let weight = |r: f64| grad("weight", vec![3.0 * (1.0 + r), 4.0 * (1.0 + r)]);
        let checks = judge(&[weight(0.9e-3), grad("bias", vec![0.0, 0.0])], &[], &layer()).unwrap();
        let w = find(&checks, "weight");
        assert!((w.error - 0.9e-3).abs() < 1e-9 && w.pass() && w.rule.layer_scale.is_none(), "{w:?}");
        let checks = judge(&[weight(1.1e-3), grad("bias", vec![0.0, 0.0])], &[], &layer()).unwrap();
        assert!(!find(&checks, "weight").pass());
    }

    #[test]
    fn a_zero_gradient_is_measured_against_its_layer() {
        // Rounding noise on a zero gradient passes; an error that matters at the layer's scale fails.
        let checks = judge(&[grad("weight", vec![3.0, 4.0]), grad("bias", vec![1e-7, 2e-7])], &[], &layer()).unwrap();
        let b = find(&checks, "bias");
        assert!(b.pass(), "{b:?}");
        let layer_scale = b.rule.layer_scale.as_ref().map(|(l, n)| (l.as_str(), *n));
        assert_eq!(layer_scale, Some(("expect.grad.fc (parameters)", 5.0)));
        // Scale = tol * 5 = 5e-3: an absolute error of 1e-5 is 2e-3 of it.
        let checks = judge(&[grad("weight", vec![3.0, 4.0]), grad("bias", vec![1e-5, 0.0])], &[], &layer()).unwrap();
        let b = find(&checks, "bias");
        assert!(!b.pass() && (b.error - 2e-3).abs() < 1e-9, "{b:?}");
    }

    #[test]
    fn one_ulps_effect_widens_the_tolerance_jumps_do_not() {
        let want = reference(&[("expect.loss", vec![2.0])]);
        let ours = Output::value("expect.loss", [2.0 * (1.0 + 3e-4)], Class::Value);
        let at = |r: f64| vec![2.0 * (1.0 + 3e-4 + r)];
        // One ulp moves our loss by 2e-4 either way: CONDITIONING_FACTOR x 2e-4 is allowed.
        let c = judge_one(&ours, &[(1, 0, at(2e-4)), (-1, 0, at(-2e-4))], &want).unwrap();
        assert_eq!(c.rule.allowance, Allowance::Conditioned);
        assert!(c.pass() && (c.tolerance - CONDITIONING_FACTOR * 2e-4).abs() < 1e-9, "{c:?}");
        assert!(c.rule.to_string().contains("conditioning"), "{}", c.rule);
        // A jump (a decision crossed by some of the runs) is not sensitivity: the smallest run counts.
        let runs = [(1, 0, at(5e-2)), (-1, 0, at(-3e-2)), (1, 1, at(1e-6)), (-1, 1, at(-1e-6))];
        let c = judge_one(&ours, &runs, &want).unwrap();
        assert!(!c.pass() && c.tolerance == 1e-4 && c.rule.witness.is_none(), "{c:?}");
        assert!((c.rule.sensitivity - 1e-6).abs() < 1e-12, "{c:?}");
    }

    #[test]
    fn a_float32_decision_is_accepted_only_when_a_perturbed_run_witnesses_it() {
        // Ours is 2e-3 off (a flipped ReLU), one ulp moves it 1e-5: the README's 1e-3 applies...
        let want = reference(&[("expect.grad.w", vec![1.0, 0.0])]);
        let ours = Output::value("expect.grad.w", [1.0, 2e-3], Class::Gradient);
        let sens = [(1, 0, vec![1.0, 2e-3 + 1e-5]), (-1, 0, vec![1.0, 2e-3 - 1e-5])];
        let c = judge_one(&ours, &sens, &want).unwrap();
        assert!(!c.pass(), "{c:?}");
        // ...unless inputs moved by DECISION_ULPS decide it back: within the same 1e-3.
        let mut runs = sens.to_vec();
        runs.push((DECISION_ULPS, 1, vec![1.0, 3e-5]));
        runs.push((-DECISION_ULPS, 1, vec![1.0, 4e-3]));
        let c = judge_one(&ours, &runs, &want).unwrap();
        let w = c.rule.witness.clone().expect("witness");
        assert!(c.pass() && w.ulps == DECISION_ULPS && (w.error - 3e-5).abs() < 1e-12, "{c:?}");
        assert!(c.rule.to_string().contains("float32 decision"), "{}", c.rule);
        // A perturbed run that is itself off does not witness anything.
        runs[2] = (DECISION_ULPS, 1, vec![1.0, 1.5e-3]);
        assert!(!judge_one(&ours, &runs, &want).unwrap().pass());
    }

    #[test]
    fn an_undetermined_tensor_is_checked_for_size_and_direction_only() {
        let want = reference(&[("expect.final.b", vec![1.0, 0.0])]);
        let out = |x: f64, y: f64| Output::value("expect.final.b", [x, y], Class::Update);
        // One ulp moves it by 10% either way: float32 does not determine it.
        let runs = |o: &Output| {
            let g = o.got.clone().unwrap();
            [(1, 0, vec![g[0], g[1] + 0.1]), (-1, 0, vec![g[0], g[1] - 0.1])]
        };
        let ours = out(1.0, 0.2);
        let c = judge_one(&ours, &runs(&ours), &want).unwrap();
        assert_eq!((c.rule.allowance, c.tolerance), (Allowance::Undetermined, UNDETERMINED_ALLOWED));
        assert!(c.pass() && c.rule.to_string().contains("undetermined"), "{c:?}");
        // Wrong direction (error 2: sign flipped) or far too large: fails however sensitive.
        for wrong in [out(-1.0, 0.2), out(2.5, 0.0)] {
            assert!(!judge_one(&wrong, &runs(&wrong), &want).unwrap().pass());
        }
        // Just under the threshold the sensitivity itself sets the tolerance.
        let ours = out(1.0, 0.0);
        let c = judge_one(&ours, &[(1, 0, vec![1.0, 0.049]), (-1, 0, vec![1.0, -0.049])], &want).unwrap();
        assert_eq!(c.rule.allowance, Allowance::Conditioned);
        assert!((c.tolerance - CONDITIONING_FACTOR * 0.049).abs() < 1e-9, "{c:?}");
    }

    #[test]
    fn updates_missing_and_extra_tensors() {
        let want = reference(&[("expect.final.w", vec![1.5, 2.0]), ("param.w", vec![1.0, 2.0])]);
        let update = |d: f64| Output {
            name: "expect.final.w".into(),
            got: Some(vec![0.5 + d, 0.0]),
            want: Want::Update { initial: "param.w".into() },
            class: Class::Update,
            layer: None,
        };
        let judged = |o: Output| judge_one(&o, &[], &want);
        assert!(judged(update(4e-4)).unwrap().pass());
        assert!(!judged(update(6e-4)).unwrap().pass());
        assert!(!judged(Output { got: None, ..update(0.0) }).unwrap().pass());
        assert!(!judged(Output { want: Want::Absent, ..update(0.0) }).unwrap().pass());
        assert!(!judged(Output { got: Some(vec![f64::NAN, 0.0]), ..update(0.0) }).unwrap().pass());
        assert_eq!(judged(Output::value("expect.nothing", [1.0], Class::Value)).unwrap_err(), "expect.nothing");
    }
}
