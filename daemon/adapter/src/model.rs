//! The adapter network and its training-side forward and backward passes.
//!
//! Architecture (Microsoft healthcareai-examples' `AdapterModel`):
//!
//! ```text
//! embedding (d) ── ×√d ── Linear d→512 ── GELU ── Linear 512→512 ── LayerNorm
//!   ── Conv1d 512→h (k=3, pad=1) ── GELU ── Conv1d h→h (k=3, pad=1) ──┬── adapter embedding (h)
//!                                                                     └── Linear h→classes ── logits
//! ```
//!
//! One photograph gives one embedding, so the convolutions see a sequence of
//! length one: their side taps only ever multiply the zero padding, get no
//! gradient and change no output. Training therefore keeps the centre tap
//! alone (an `h × in` matrix); the exported ONNX has real `Conv` nodes with
//! zero side taps, which computes exactly the same thing.
//!
//! The encoder's embeddings are L2-normalised, so each of their `d` values is
//! about `1/√d`; scaling by `√d` gives the unit-scale inputs that PyTorch's
//! default initialisation (which we copy) expects.

use ndarray::linalg::general_mat_mul;
use ndarray::{s, Array1, Array2, ArrayView2, Axis};
use rand::rngs::StdRng;
use rand::RngExt;

/// Width of the two linear layers before the convolutions (fixed by the reference).
pub const PROJECTION_WIDTH: usize = 512;
/// LayerNorm epsilon (PyTorch's default).
pub const LAYER_NORM_EPS: f32 = 1e-5;

/// Shape of an adapter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdapterShape {
    /// The encoder's embedding dimension.
    pub input_dim: usize,
    /// `h`: the adapter embedding's dimension.
    pub hidden: usize,
    pub classes: usize,
}

/// All trainable parameters, row-major, `out × in` like PyTorch.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterWeights {
    pub shape: AdapterShape,
    pub input_scale: f32,
    pub w1: Array2<f32>,
    pub b1: Array1<f32>,
    pub w2: Array2<f32>,
    pub b2: Array1<f32>,
    pub norm_gain: Array1<f32>,
    pub norm_bias: Array1<f32>,
    /// Centre tap of the first Conv1d, `h × 512`.
    pub conv1: Array2<f32>,
    pub conv1_bias: Array1<f32>,
    /// Centre tap of the second Conv1d, `h × h`.
    pub conv2: Array2<f32>,
    pub conv2_bias: Array1<f32>,
    pub head: Array2<f32>,
    pub head_bias: Array1<f32>,
}

/// What a forward pass keeps for the backward pass.
pub(crate) struct Activations {
    x: Array2<f32>,
    z1: Array2<f32>,
    a1: Array2<f32>,
    normalised: Array2<f32>,
    inv_std: Array1<f32>,
    y: Array2<f32>,
    c1: Array2<f32>,
    a3: Array2<f32>,
    /// The adapter embedding (before any normalisation).
    pub(crate) embedding: Array2<f32>,
    pub(crate) logits: Array2<f32>,
}

fn uniform(rng: &mut StdRng, rows: usize, cols: usize, bound: f32) -> Array2<f32> {
    Array2::from_shape_fn((rows, cols), |_| rng.random_range(-bound..bound))
}

fn uniform_vec(rng: &mut StdRng, len: usize, bound: f32) -> Array1<f32> {
    Array1::from_shape_fn(len, |_| rng.random_range(-bound..bound))
}

impl AdapterWeights {
    /// PyTorch's default initialisation: weights and biases uniform in
    /// ±1/√fan_in (Conv1d's fan_in counts all three taps).
    pub fn initialise(shape: AdapterShape, rng: &mut StdRng) -> Self {
        let p = PROJECTION_WIDTH;
        let h = shape.hidden;
        let bound = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
        Self {
            shape,
            input_scale: (shape.input_dim as f32).sqrt(),
            w1: uniform(rng, p, shape.input_dim, bound(shape.input_dim)),
            b1: uniform_vec(rng, p, bound(shape.input_dim)),
            w2: uniform(rng, p, p, bound(p)),
            b2: uniform_vec(rng, p, bound(p)),
            norm_gain: Array1::ones(p),
            norm_bias: Array1::zeros(p),
            conv1: uniform(rng, h, p, bound(p * 3)),
            conv1_bias: uniform_vec(rng, h, bound(p * 3)),
            conv2: uniform(rng, h, h, bound(h * 3)),
            conv2_bias: uniform_vec(rng, h, bound(h * 3)),
            head: uniform(rng, shape.classes, h, bound(h)),
            head_bias: uniform_vec(rng, shape.classes, bound(h)),
        }
    }

    /// The parameters as flat slices, in a fixed order (optimiser state
    /// follows the same order).
    pub(crate) fn tensors_mut(&mut self) -> [&mut [f32]; 12] {
        fn flat2(a: &mut Array2<f32>) -> &mut [f32] {
            a.as_slice_mut().unwrap_or(&mut [])
        }
        fn flat1(a: &mut Array1<f32>) -> &mut [f32] {
            a.as_slice_mut().unwrap_or(&mut [])
        }
        [
            flat2(&mut self.w1),
            flat1(&mut self.b1),
            flat2(&mut self.w2),
            flat1(&mut self.b2),
            flat1(&mut self.norm_gain),
            flat1(&mut self.norm_bias),
            flat2(&mut self.conv1),
            flat1(&mut self.conv1_bias),
            flat2(&mut self.conv2),
            flat1(&mut self.conv2_bias),
            flat2(&mut self.head),
            flat1(&mut self.head_bias),
        ]
    }

    /// Forward pass over a batch of encoder embeddings (`batch × d`).
    pub(crate) fn forward(&self, embeddings: ArrayView2<f32>) -> Activations {
        let x = &embeddings * self.input_scale;
        let z1 = linear(&x.view(), &self.w1, &self.b1);
        let a1 = z1.mapv(gelu);
        let z2 = linear(&a1.view(), &self.w2, &self.b2);
        let (normalised, inv_std) = layer_norm(&z2);
        let y = &normalised * &self.norm_gain + &self.norm_bias;
        let c1 = linear(&y.view(), &self.conv1, &self.conv1_bias);
        let a3 = c1.mapv(gelu);
        let embedding = linear(&a3.view(), &self.conv2, &self.conv2_bias);
        let logits = linear(&embedding.view(), &self.head, &self.head_bias);
        Activations {
            x,
            z1,
            a1,
            normalised,
            inv_std,
            y,
            c1,
            a3,
            embedding,
            logits,
        }
    }

    /// Logits and adapter embeddings for a batch (no training state kept).
    pub fn infer(&self, embeddings: ArrayView2<f32>) -> (Array2<f32>, Array2<f32>) {
        let act = self.forward(embeddings);
        (act.logits, act.embedding)
    }

    /// Gradients of the loss whose derivative with respect to the logits is
    /// `d_logits`, in the order of [`AdapterWeights::tensors_mut`].
    pub(crate) fn backward(&self, act: &Activations, d_logits: &Array2<f32>) -> Gradients {
        let d_head = dot(d_logits.t(), act.embedding.view());
        let d_head_bias = d_logits.sum_axis(Axis(0));
        let d_embedding = d_logits.dot(&self.head);

        let d_conv2 = dot(d_embedding.t(), act.a3.view());
        let d_conv2_bias = d_embedding.sum_axis(Axis(0));
        let d_a3 = d_embedding.dot(&self.conv2);
        let d_c1 = d_a3 * act.c1.mapv(gelu_derivative);

        let d_conv1 = dot(d_c1.t(), act.y.view());
        let d_conv1_bias = d_c1.sum_axis(Axis(0));
        let d_y = d_c1.dot(&self.conv1);

        let d_norm_gain = (&d_y * &act.normalised).sum_axis(Axis(0));
        let d_norm_bias = d_y.sum_axis(Axis(0));
        let d_normalised = &d_y * &self.norm_gain;
        let d_z2 = layer_norm_backward(&d_normalised, &act.normalised, &act.inv_std);

        let d_w2 = dot(d_z2.t(), act.a1.view());
        let d_b2 = d_z2.sum_axis(Axis(0));
        let d_a1 = d_z2.dot(&self.w2);
        let d_z1 = d_a1 * act.z1.mapv(gelu_derivative);
        let d_w1 = dot(d_z1.t(), act.x.view());
        let d_b1 = d_z1.sum_axis(Axis(0));

        Gradients([
            into_flat2(d_w1),
            d_b1.to_vec(),
            into_flat2(d_w2),
            d_b2.to_vec(),
            d_norm_gain.to_vec(),
            d_norm_bias.to_vec(),
            into_flat2(d_conv1),
            d_conv1_bias.to_vec(),
            into_flat2(d_conv2),
            d_conv2_bias.to_vec(),
            into_flat2(d_head),
            d_head_bias.to_vec(),
        ])
    }
}

fn into_flat2(a: Array2<f32>) -> Vec<f32> {
    // `.t().dot()` results are in standard layout, but do not rely on it.
    a.as_standard_layout().iter().copied().collect()
}

/// Per-tensor gradients in the order of [`AdapterWeights::tensors_mut`].
pub(crate) struct Gradients(pub(crate) [Vec<f32>; 12]);

fn linear(x: &ArrayView2<f32>, weight: &Array2<f32>, bias: &Array1<f32>) -> Array2<f32> {
    dot(x.view(), weight.t()) + bias
}

/// Products smaller than this many multiply-adds stay on one thread.
const PARALLEL_MACS: usize = 8 << 20;

/// `a · b`, the output's columns split between two threads when the
/// product is large (the first layer's 2048-wide products are most of
/// training). Each column block is computed the same way whatever the
/// split, so results do not depend on the thread count.
fn dot(a: ArrayView2<f32>, b: ArrayView2<f32>) -> Array2<f32> {
    let (rows, inner) = a.dim();
    let cols = b.ncols();
    let mut out = Array2::zeros((rows, cols));
    if rows * inner * cols < PARALLEL_MACS || cols < 2 {
        general_mat_mul(1.0, &a, &b, 0.0, &mut out);
        return out;
    }
    let half = cols / 2;
    let (b_left, b_right) = b.split_at(Axis(1), half);
    let (mut out_left, mut out_right) = out.view_mut().split_at(Axis(1), half);
    std::thread::scope(|scope| {
        scope.spawn(|| general_mat_mul(1.0, &a, &b_right, 0.0, &mut out_right));
        general_mat_mul(1.0, &a, &b_left, 0.0, &mut out_left);
    });
    out
}

/// Exact GELU (PyTorch's default), spelled with `Erf` in the exported graph.
pub(crate) fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2))
}

fn gelu_derivative(x: f32) -> f32 {
    let cdf = 0.5 * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2));
    let pdf = (-0.5 * x * x).exp() / (2.0 * std::f32::consts::PI).sqrt();
    cdf + x * pdf
}

fn layer_norm(z: &Array2<f32>) -> (Array2<f32>, Array1<f32>) {
    let width = z.ncols() as f32;
    let mut normalised = z.clone();
    let mut inv_std = Array1::zeros(z.nrows());
    for (mut row, inv) in normalised.rows_mut().into_iter().zip(inv_std.iter_mut()) {
        let mean = row.sum() / width;
        row.mapv_inplace(|v| v - mean);
        let variance = row.iter().map(|v| v * v).sum::<f32>() / width;
        *inv = 1.0 / (variance + LAYER_NORM_EPS).sqrt();
        let scale = *inv;
        row.mapv_inplace(|v| v * scale);
    }
    (normalised, inv_std)
}

fn layer_norm_backward(
    d_normalised: &Array2<f32>,
    normalised: &Array2<f32>,
    inv_std: &Array1<f32>,
) -> Array2<f32> {
    let width = d_normalised.ncols() as f32;
    let mut d_z = Array2::zeros(d_normalised.raw_dim());
    for i in 0..d_normalised.nrows() {
        let dn = d_normalised.slice(s![i, ..]);
        let n = normalised.slice(s![i, ..]);
        let mean_dn = dn.sum() / width;
        let mean_dn_n = dn.iter().zip(n.iter()).map(|(a, b)| a * b).sum::<f32>() / width;
        let mut out = d_z.slice_mut(s![i, ..]);
        for ((o, a), b) in out.iter_mut().zip(dn.iter()).zip(n.iter()) {
            *o = inv_std[i] * (a - mean_dn - b * mean_dn_n);
        }
    }
    d_z
}

/// Row-wise softmax.
pub fn softmax(logits: &Array2<f32>) -> Array2<f32> {
    let mut out = logits.clone();
    for mut row in out.rows_mut() {
        let max = row.fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        row.mapv_inplace(|v| (v - max).exp());
        let sum = row.sum();
        row.mapv_inplace(|v| v / sum);
    }
    out
}

/// AdamW as in PyTorch (decoupled weight decay applied before the step).
pub(crate) struct AdamW {
    pub learning_rate: f32,
    pub weight_decay: f32,
    beta1: f32,
    beta2: f32,
    epsilon: f32,
    step: i32,
    first_moment: Vec<Vec<f32>>,
    second_moment: Vec<Vec<f32>>,
}

impl AdamW {
    pub(crate) fn new(weights: &mut AdapterWeights, learning_rate: f32, weight_decay: f32) -> Self {
        let sizes: Vec<usize> = weights.tensors_mut().iter().map(|t| t.len()).collect();
        Self {
            learning_rate,
            weight_decay,
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
            step: 0,
            first_moment: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            second_moment: sizes.iter().map(|&n| vec![0.0; n]).collect(),
        }
    }

    pub(crate) fn step(&mut self, weights: &mut AdapterWeights, gradients: &Gradients) {
        self.step += 1;
        let correction1 = 1.0 - self.beta1.powi(self.step);
        let correction2 = 1.0 - self.beta2.powi(self.step);
        let decay = 1.0 - self.learning_rate * self.weight_decay;
        let step_size = self.learning_rate / correction1;
        for (((param, grad), m), v) in weights
            .tensors_mut()
            .into_iter()
            .zip(gradients.0.iter())
            .zip(self.first_moment.iter_mut())
            .zip(self.second_moment.iter_mut())
        {
            for (((p, &g), m), v) in param
                .iter_mut()
                .zip(grad.iter())
                .zip(m.iter_mut())
                .zip(v.iter_mut())
            {
                *p *= decay;
                *m = self.beta1 * *m + (1.0 - self.beta1) * g;
                *v = self.beta2 * *v + (1.0 - self.beta2) * g * g;
                let denom = (*v / correction2).sqrt() + self.epsilon;
                *p -= step_size * *m / denom;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// Weighted cross-entropy, as training uses it, for the gradient check.
    fn loss(weights: &AdapterWeights, x: &Array2<f32>, labels: &[usize]) -> f64 {
        let (logits, _) = weights.infer(x.view());
        let p = softmax(&logits);
        labels
            .iter()
            .enumerate()
            .map(|(i, &y)| -(p[[i, y]] as f64).ln())
            .sum::<f64>()
            / labels.len() as f64
    }

    #[test]
    fn gradients_match_finite_differences() {
        let mut rng = StdRng::seed_from_u64(3);
        let shape = AdapterShape {
            input_dim: 12,
            hidden: 6,
            classes: 3,
        };
        let mut weights = AdapterWeights::initialise(shape, &mut rng);
        let x = Array2::from_shape_fn((5, 12), |_| rng.random_range(-0.5f32..0.5));
        let labels = [0usize, 2, 1, 1, 0];
        let act = weights.forward(x.view());
        let mut d_logits = softmax(&act.logits);
        for (i, &y) in labels.iter().enumerate() {
            d_logits[[i, y]] -= 1.0;
        }
        d_logits /= labels.len() as f32;
        let grads = weights.backward(&act, &d_logits);
        // Check a few coordinates of every tensor against central differences.
        for tensor in 0..12 {
            let len = weights.tensors_mut()[tensor].len();
            for &index in &[0, len / 2, len - 1] {
                let original = weights.tensors_mut()[tensor][index];
                let h = 1e-2f32;
                weights.tensors_mut()[tensor][index] = original + h;
                let up = loss(&weights, &x, &labels);
                weights.tensors_mut()[tensor][index] = original - h;
                let down = loss(&weights, &x, &labels);
                weights.tensors_mut()[tensor][index] = original;
                let numeric = (up - down) / (2.0 * h as f64);
                let analytic = grads.0[tensor][index] as f64;
                assert!(
                    (numeric - analytic).abs() <= 2e-3 + 2e-2 * numeric.abs(),
                    "tensor {tensor} index {index}: numeric {numeric}, analytic {analytic}"
                );
            }
        }
    }

    #[test]
    fn gelu_matches_known_values() {
        assert!((gelu(0.0)).abs() < 1e-7);
        assert!((gelu(1.0) - 0.841_344_7).abs() < 1e-5);
        assert!((gelu(-1.0) + 0.158_655_25).abs() < 1e-5);
    }
}
