//! The judging rule, in one place: whether a tensor our implementation produced matches the float64
//! reference. `cases/README.md` gives the rule and the measurements behind it; for every tensor:
//!
//! ```text
//! scale        = max(||want||, tol * ||layer||)  a tensor is never measured against less than the
//!                                                tolerance's share of its layer: a gradient that is
//!                                                zero in float64 is judged against its layer
//! error        = ||got - want|| / scale
//! conditioning = max_i ||got_i - got|| / scale   got_i: our own run on the case's inputs moved by
//!                                                +-PERTURBATION_ULPS ulps (PERTURBATION_PATTERNS
//!                                                random sign patterns, each both ways): what float32
//!                                                rounding alone does to this tensor
//! allowed      = tol                             when CONDITIONING_FACTOR * conditioning <= tol
//!              = CONDITIONING_FACTOR * conditioning   while conditioning < UNDETERMINED
//!              = UNDETERMINED_ALLOWED            otherwise: float32 does not determine the tensor,
//!                                                only its size and direction are checked
//! pass         = error <= allowed                (NaN, infinities and shape mismatches fail)
//! ```
//!
//! `tol` is the README's tolerance of the tensor's [`Class`]; `||layer||` is the norm of the
//! reference tensors of the same module and role (the parameter gradients of `projection_head.0`,
//! say). Norms are L2 over every element, in f64.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// The conditioning runs move every input value by this many ulps: the case's storage rounding is
/// at most half of one, but float32 arithmetic moves the network's pre-activations by several; four
/// reach the ReLU decision that float32 flips in the shared ResNet-18 case, one does not.
pub const PERTURBATION_ULPS: i64 = 4;

/// Pseudo-random sign patterns of the conditioning runs; each runs both ways (`+ulps`, `-ulps`), so
/// that a decision within reach (a ReLU input, a max-pool tie) is crossed by one of the two.
pub const PERTURBATION_PATTERNS: u64 = 2;

/// How much larger than the measured conditioning an error may be (the measurement is the largest
/// of a few random samples, not a bound).
pub const CONDITIONING_FACTOR: f64 = 2.0;

/// Conditioning from which float32 does not determine a tensor: the perturbed runs move it by 5% or
/// more. Such a tensor is mostly float32 rounding noise (the LARC update of a bias whose gradient is
/// zero in float64), and the runs share much of that noise, so they underestimate it: PyTorch's own
/// float32 run misses such tensors by 18-62%.
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
    /// [`CONDITIONING_FACTOR`] times the measured conditioning, above the README's tolerance.
    Conditioned,
    /// [`UNDETERMINED_ALLOWED`]: the conditioning reached [`UNDETERMINED`].
    Undetermined,
}

/// Why a tensor was judged as it was.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    /// What the tensor is, which sets the README tolerance.
    pub class: Class,
    /// Set when the reference tensor is negligible within its layer, so that the layer's norm times
    /// the tolerance set the scale: the layer and its reference norm.
    pub layer_scale: Option<(String, f64)>,
    /// The largest `||got_i - got|| / scale` of the perturbed runs; NaN when not measurable.
    pub conditioning: f64,
    /// Where the allowed error comes from.
    pub allowance: Allowance,
    /// A structural failure (a tensor missing on one side), when there is one.
    pub note: Option<&'static str>,
}

/// One judged tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Check {
    /// The case's tensor (`expect.grad.conv1.weight`).
    pub name: String,
    /// `||got - want|| / scale`; infinite when the shapes differ or a value is not finite.
    pub error: f64,
    /// The error this tensor may have.
    pub tolerance: f64,
    /// How the tolerance and the scale were chosen.
    pub rule: Rule,
}

impl Check {
    /// Within the tolerance; NaN and infinite errors fail.
    pub fn pass(&self) -> bool {
        self.error <= self.tolerance
    }
}

impl fmt::Display for Rule {
    /// `gradient 1e-3 relative`, `gradient 1e-3 against layer expect.grad.x (parameters) (norm
    /// 1.3e1)`, `..., float32 conditioning 2 x 7.2e-4`, `..., undetermined in float32 (...)`.
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
            Allowance::Readme => Ok(()),
            Allowance::Conditioned => {
                write!(f, ", float32 conditioning {CONDITIONING_FACTOR} x {:.2e}", self.conditioning)
            }
            Allowance::Undetermined => write!(
                f,
                ", undetermined in float32 ({PERTURBATION_ULPS}-ulp inputs move it {:.2e}): size and direction only",
                self.conditioning
            ),
        }
    }
}

/// The reference side of the comparison, from the case's tensors.
pub trait Reference {
    /// The case's tensor `name` as f64, if it has one.
    fn tensor(&self, name: &str) -> Option<Vec<f64>>;
}

/// Judges the outputs of our run on the case (`outputs`) against the case (`reference`), with
/// `perturbed`: the outputs of each of our runs on the case's perturbed inputs. A missing reference
/// tensor is an unusable case (returned as the error's name), not a failed check.
pub fn judge(outputs: &[Output], perturbed: &[Vec<Output>], reference: &impl Reference) -> Result<Vec<Check>, String> {
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
    let perturbed: Vec<HashMap<&str, &Output>> =
        perturbed.iter().map(|run| run.iter().map(|o| (o.name.as_str(), o)).collect()).collect();

    let mut checks = Vec::with_capacity(outputs.len());
    for (o, want) in outputs.iter().zip(&wants) {
        let tol = o.class.tolerance();
        let mut rule = Rule {
            class: o.class,
            layer_scale: None,
            conditioning: f64::NAN,
            allowance: Allowance::Readme,
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
        let error = scaled_distance(got, want, scale);
        rule.conditioning = perturbed
            .iter()
            .map(|run| match run.get(o.name.as_str()).and_then(|p| p.got.as_ref()) {
                Some(p) if p.len() == got.len() => scaled_distance(p, got, scale),
                _ => f64::NAN,
            })
            .fold(f64::NAN, f64::max);
        // NaN conditioning (not measurable) leaves the README's tolerance alone.
        let widened = CONDITIONING_FACTOR * rule.conditioning;
        let tolerance = if rule.conditioning >= UNDETERMINED {
            rule.allowance = Allowance::Undetermined;
            UNDETERMINED_ALLOWED
        } else if widened > tol {
            rule.allowance = Allowance::Conditioned;
            widened
        } else {
            tol
        };
        checks.push(Check { name: o.name.clone(), error, tolerance, rule });
    }
    Ok(checks)
}

fn sum_sq(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum()
}

/// `||a - b|| / scale`; infinite on a length mismatch or a non-finite value of `a`; the bare
/// distance when `scale` is 0 (a reference and layer that are exactly zero).
fn scaled_distance(a: &[f64], b: &[f64], scale: f64) -> f64 {
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

    /// Judges one output, with one perturbed run per entry of `moved`.
    fn judge_one(ours: &Output, moved: &[&Output], want: &Map) -> Result<Check, String> {
        let reruns: Vec<Vec<Output>> = moved.iter().map(|&o| vec![o.clone()]).collect();
        judge(std::slice::from_ref(ours), &reruns, want).map(|mut c| c.remove(0))
    }

    fn check<'a>(checks: &'a [Check], name: &str) -> &'a Check {
        checks.iter().find(|c| c.name.ends_with(name)).unwrap()
    }

    /// A weight gradient of norm 5 and a bias gradient that is zero in float64.
    fn layer() -> Map {
        reference(&[("expect.grad.fc.weight", vec![3.0, 4.0]), ("expect.grad.fc.bias", vec![1e-16, -1e-16])])
    }

    #[test]
    fn relative_error_against_the_tolerance() {
        let outs = [grad("weight", vec![3.0 * (1.0 + 0.9e-3), 4.0 * (1.0 + 0.9e-3)]), grad("bias", vec![0.0, 0.0])];
        let checks = judge(&outs, &[outs.to_vec()], &layer()).unwrap();
        let w = check(&checks, "weight");
        assert!((w.error - 0.9e-3).abs() < 1e-9 && w.pass() && w.rule.layer_scale.is_none(), "{w:?}");
        let outs = [grad("weight", vec![3.0 * (1.0 + 1.1e-3), 4.0 * (1.0 + 1.1e-3)]), grad("bias", vec![0.0, 0.0])];
        assert!(!check(&judge(&outs, &[outs.to_vec()], &layer()).unwrap(), "weight").pass());
    }

    #[test]
    fn a_zero_gradient_is_measured_against_its_layer() {
        // Rounding noise on a zero gradient passes; an error that matters at the layer's scale fails.
        let noise = [grad("weight", vec![3.0, 4.0]), grad("bias", vec![1e-7, 2e-7])];
        let checks = judge(&noise, &[noise.to_vec()], &layer()).unwrap();
        let b = check(&checks, "bias");
        assert!(b.pass(), "{b:?}");
        assert_eq!(
            b.rule.layer_scale.as_ref().map(|(l, n)| (l.as_str(), *n)),
            Some(("expect.grad.fc (parameters)", 5.0))
        );
        // Scale = tol * 5 = 5e-3: an absolute error of 1e-5 is 2e-3 of it.
        let wrong = [grad("weight", vec![3.0, 4.0]), grad("bias", vec![1e-5, 0.0])];
        let b =
            judge(&wrong, &[wrong.to_vec()], &layer()).unwrap().into_iter().find(|c| c.name.ends_with("bias")).unwrap();
        assert!(!b.pass() && (b.error - 2e-3).abs() < 1e-9, "{b:?}");
    }

    #[test]
    fn measured_conditioning_widens_the_tolerance() {
        let want = reference(&[("expect.loss", vec![2.0])]);
        let ours = [Output::value("expect.loss", [2.0 * (1.0 + 3e-4) as f32], Class::Value)];
        // One ulp of input moves our loss by 2e-4 relative: 2 x 2e-4 = 4e-4 is allowed.
        let moved = [Output::value("expect.loss", [2.0 * (1.0 + 3e-4 + 2e-4) as f32], Class::Value)];
        let c = &judge(&ours, &[moved.to_vec()], &want).unwrap()[0];
        assert!(c.pass() && (c.tolerance - 4e-4).abs() < 1e-6, "{c:?}");
        assert!(c.rule.to_string().contains("conditioning"), "{}", c.rule);
        // Unmoved: the README's 1e-4.
        let c = &judge(&ours, &[ours.to_vec()], &want).unwrap()[0];
        assert!(!c.pass() && c.tolerance == 1e-4, "{c:?}");
        // The largest move of several runs counts.
        let c = &judge(&ours, &[ours.to_vec(), moved.to_vec(), ours.to_vec()], &want).unwrap()[0];
        assert!((c.tolerance - 4e-4).abs() < 1e-6, "{c:?}");
    }

    #[test]
    fn an_undetermined_tensor_is_checked_for_size_and_direction_only() {
        let want = reference(&[("expect.final.b", vec![1.0, 0.0])]);
        let out = |x: f64, y: f64| Output::value("expect.final.b", [x, y], Class::Update);
        // The perturbed runs move it by 10%: float32 does not determine it.
        let moved = out(1.0, 0.3);
        let c = &judge_one(&out(1.0, 0.2), &[&moved], &want).unwrap();
        assert_eq!((c.rule.allowance, c.tolerance), (Allowance::Undetermined, UNDETERMINED_ALLOWED));
        assert!(c.pass() && c.rule.to_string().contains("undetermined"), "{c:?}");
        // Wrong direction (error 2: sign flipped) or far too large: fails however erratic the runs.
        assert!(!judge_one(&out(-1.0, 0.2), &[&moved], &want).unwrap().pass());
        assert!(!judge_one(&out(2.5, 0.0), &[&out(9.0, 0.0)], &want).unwrap().pass());
        // Just under the threshold the conditioning itself sets the tolerance.
        let c = &judge_one(&out(1.0, 0.0), &[&out(1.0, 0.049)], &want).unwrap();
        assert_eq!(c.rule.allowance, Allowance::Conditioned);
        assert!((c.tolerance - 0.098).abs() < 1e-9, "{c:?}");
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
        let judged = |o: Output| judge_one(&o, &[&o], &want);
        assert!(judged(update(4e-4)).unwrap().pass());
        assert!(!judged(update(6e-4)).unwrap().pass());
        assert!(!judged(Output { got: None, ..update(0.0) }).unwrap().pass());
        assert!(!judged(Output { want: Want::Absent, ..update(0.0) }).unwrap().pass());
        assert!(!judged(Output { got: Some(vec![f64::NAN, 0.0]), ..update(0.0) }).unwrap().pass());
        assert_eq!(judged(Output::value("expect.nothing", [1.0], Class::Value)).unwrap_err(), "expect.nothing");
    }
}
