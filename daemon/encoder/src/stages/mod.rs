//! Fused stages: the steps tract runs as separate passes between two matrix
//! products, run as one op each.
//!
//! Why this exists: tract 0.23.9 has no x86 kernel for depthwise
//! convolutions (its generic walk runs at 3-5 GMAC/s, a sixth of an int8
//! embedding) and a slow max-pool, and in the int8 graph it runs every step
//! around them as its own pass over memory: i32 -> f32 cast, per-channel
//! rescale and bias, Relu, the depthwise or pool, clip, cast to u8; a
//! stride is one copy per axis.
//! [`fuse_stages`] rewrites the decluttered graph so that each
//! 3x3/1/1 depthwise convolution becomes a [`DepthwiseStage`], each max
//! pool a [`MaxPoolStage`] and the strided input of each residual shortcut
//! a [`SubsampleStage`], which read their input once and write their output
//! once, with whichever of those steps surround them in the graph taken
//! inside. The matrix products stay tract's.
//!
//! The arithmetic per element is the graph's own: the same products and sums
//! in f32 (only their order differs), the same maxima, the same clip and
//! truncating cast.

mod depthwise;
mod max_pool;
mod subsample;

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cast::Cast;

pub use depthwise::DepthwiseStage;
pub use max_pool::MaxPoolStage;
pub use subsample::SubsampleStage;

/// What [`fuse_stages`] replaced: how many depthwise convolutions, max pools
/// and strided-convolution inputs, and how many of them also took in the
/// integer dequantization before them or the quantization after them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StageFusion {
    pub depthwise: usize,
    pub depthwise_dequantize: usize,
    pub depthwise_quantize: usize,
    pub max_pool: usize,
    pub max_pool_dequantize: usize,
    pub subsample: usize,
    pub subsample_quantize: usize,
}

/// Replaces the depthwise convolutions, max pools and shortcut strides of
/// `model` (a decluttered typed model) that a stage covers by fused stages.
pub fn fuse_stages(model: &mut TypedModel) -> TractResult<StageFusion> {
    let mut fusion = StageFusion::default();
    depthwise::fuse(model, &mut fusion)?;
    max_pool::fuse(model, &mut fusion)?;
    subsample::fuse(model, &mut fusion)?;
    model.compact()?;
    Ok(fusion)
}

/// Wires `op` to read `reads` and take over the consumers of `replaces`;
/// the nodes in between are left unread, for `compact` to drop.
fn replace_with_stage(
    model: &mut TypedModel,
    name: String,
    op: impl Into<Box<dyn TypedOp>>,
    reads: OutletId,
    replaces: OutletId,
) -> TractResult<()> {
    let mut patch = TypedModelPatch::new(format!("dermascope stage {name}"));
    let tap = patch.tap_model(model, reads)?;
    let wire = patch.wire_node(name, op, &[tap])?[0];
    patch.shunt_outside(model, replaces, wire)?;
    patch.apply(model)
}

/// Fails unless `input` is what the stage named `stage` was planned for.
fn check_input(
    stage: &str,
    input: &Tensor,
    datum_type: DatumType,
    shape: &[usize],
) -> TractResult<()> {
    ensure!(
        input.shape() == shape && input.datum_type() == datum_type,
        "{stage} stage expects {datum_type:?} {shape:?}, got {:?} {:?}",
        input.datum_type(),
        input.shape()
    );
    Ok(())
}

/// What a stage reads.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum StageInput {
    /// f32 activations.
    Float,
    /// The i32 accumulator of an integer convolution, turned into f32 as
    /// `acc as f32 * scale[c] + shift[c]`.
    Dequantize {
        scale: Arc<Tensor>,
        shift: Arc<Tensor>,
    },
}

impl StageInput {
    fn datum_type(&self) -> DatumType {
        match self {
            StageInput::Float => f32::datum_type(),
            StageInput::Dequantize { .. } => i32::datum_type(),
        }
    }

    fn describe(&self) -> &'static str {
        match self {
            StageInput::Float => "f32",
            StageInput::Dequantize { .. } => "i32 dequantized",
        }
    }
}

/// Where the stage reads, and how, for a stage whose f32 input is `outlet`
/// (channels on axis `channel_axis`): the i32 before `Cast -> Mul(scale) ->
/// Add(shift)` when `outlet` is the end of that chain, with one scale and
/// shift per channel, and nothing else reads its steps; else `outlet`.
fn dequantize_prologue(
    model: &TypedModel,
    outlet: OutletId,
    channel_axis: usize,
) -> TractResult<(StageInput, OutletId)> {
    let unchanged = Ok((StageInput::Float, outlet));
    let Some(shape) = model
        .outlet_fact(outlet)?
        .shape
        .as_concrete()
        .map(TVec::from)
    else {
        return unchanged;
    };
    let (rank, channels) = (shape.len(), shape[channel_axis]);
    let Some(add) = unary_with_constant(model, outlet, "Add")? else {
        return unchanged;
    };
    let Some(mul) = unary_with_constant(model, add.other, "Mul")? else {
        return unchanged;
    };
    let cast = model.node(mul.other.node);
    if cast.op_as::<Cast>().is_none()
        || !read_once(model, mul.other)?
        || model.outlet_fact(cast.inputs[0])?.datum_type != i32::datum_type()
    {
        return unchanged;
    }
    let (Some(scale), Some(shift)) = (
        per_channel(&mul.constant, channel_axis, rank, channels)?,
        per_channel(&add.constant, channel_axis, rank, channels)?,
    ) else {
        return unchanged;
    };
    Ok((StageInput::Dequantize { scale, shift }, cast.inputs[0]))
}

/// Fills one f32 row from one f32 input row (with the Relu, if taken in).
#[inline(always)]
fn load_float_row(src: &[f32], dst: &mut [f32], relu: bool) {
    if relu {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = s.max(0.0);
        }
    } else {
        dst.copy_from_slice(src);
    }
}

/// Fills one f32 row from one row of an integer product's i32 output, with
/// its channel's `scale` and `shift` (and the Relu, if taken in).
#[inline(always)]
fn load_dequantized_row(src: &[i32], dst: &mut [f32], scale: f32, shift: f32, relu: bool) {
    // The graph's Cast, Mul and Add (and Max), unfused, so that rounding is
    // the graph's.
    if relu {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = (s as f32 * scale + shift).max(0.0);
        }
    } else {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = s as f32 * scale + shift;
        }
    }
}

/// A stage's work on one chunk of planes, run by [`with_widest_vectors`].
/// `run` must be `#[inline(always)]`: that is what compiles its loops into
/// each entry point below with that entry point's instructions (a closure
/// would be compiled once, for the baseline CPU).
trait VectorJob {
    fn run(self);
}

/// Runs `job` with the widest vectors this CPU has. The stages' loops are
/// written for the compiler to vectorise; these entry points let it use
/// AVX-512 or AVX2 without building the whole binary for one CPU (on
/// aarch64, NEON is always there).
#[inline(always)]
fn with_widest_vectors(job: impl VectorJob) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx2")
        {
            // SAFETY: the CPU has the features the function is built for.
            return unsafe { with_avx512(job) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe { with_avx2(job) };
        }
    }
    job.run()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2")]
unsafe fn with_avx512(job: impl VectorJob) {
    job.run()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn with_avx2(job: impl VectorJob) {
    job.run()
}

/// An f32 kept by its bits, so that the op can be compared and hashed as
/// tract requires of every op.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct F32Bits(u32);

impl F32Bits {
    fn new(value: f32) -> Self {
        F32Bits(value.to_bits())
    }
    fn get(self) -> f32 {
        f32::from_bits(self.0)
    }
}

/// A binary op with one constant operand, seen from its output.
struct WithConstant {
    /// The non-constant operand.
    other: OutletId,
    constant: Arc<Tensor>,
}

/// The node producing `outlet`, if it is the binary op `name` with one
/// constant f32 operand, its other operand has `outlet`'s shape and
/// `outlet` has exactly one consumer.
fn unary_with_constant(
    model: &TypedModel,
    outlet: OutletId,
    name: &str,
) -> TractResult<Option<WithConstant>> {
    let node = model.node(outlet.node);
    if node.op.name() != name || node.inputs.len() != 2 || !read_once(model, outlet)? {
        return Ok(None);
    }
    for (constant, other) in [(1, 0), (0, 1)] {
        let fact = model.outlet_fact(node.inputs[constant])?;
        if let Some(value) = &fact.konst {
            let data = model.outlet_fact(node.inputs[other])?;
            // The constant may broadcast; the data it meets must not, or the
            // op would change the shape the stage works on.
            if value.datum_type() == f32::datum_type()
                && data.datum_type == f32::datum_type()
                && data.shape == model.outlet_fact(outlet)?.shape
            {
                return Ok(Some(WithConstant {
                    other: node.inputs[other],
                    constant: value.clone(),
                }));
            }
        }
    }
    Ok(None)
}

/// A binary op with one constant operand, seen from its input.
struct ConsumerWithConstant {
    outlet: OutletId,
    constant: Arc<Tensor>,
}

/// The only consumer of `outlet`, if it is the binary op `name` with a
/// constant f32 other operand and keeps `outlet`'s shape.
fn single_consumer_with_constant(
    model: &TypedModel,
    outlet: OutletId,
    name: &str,
) -> TractResult<Option<ConsumerWithConstant>> {
    if !read_once(model, outlet)? {
        return Ok(None);
    }
    let only = model.outlet_successors(outlet)[0];
    let node = model.node(only.node);
    if node.op.name() != name || node.inputs.len() != 2 {
        return Ok(None);
    }
    let other = node.inputs[1 - only.slot];
    let same_shape =
        model.outlet_fact(OutletId::new(node.id, 0))?.shape == model.outlet_fact(outlet)?.shape;
    match &model.outlet_fact(other)?.konst {
        Some(value) if value.datum_type() == f32::datum_type() && same_shape => {
            Ok(Some(ConsumerWithConstant {
                outlet: OutletId::new(node.id, 0),
                constant: value.clone(),
            }))
        }
        _ => Ok(None),
    }
}

/// Whether one op, and nothing else (not even the model's outputs), reads
/// `outlet`: only then may a stage swallow the op producing it.
fn read_once(model: &TypedModel, outlet: OutletId) -> TractResult<bool> {
    Ok(model.outlet_successors(outlet).len() == 1 && !model.output_outlets()?.contains(&outlet))
}

/// `value` as one f32 per channel of a rank-`rank` tensor whose channels
/// are axis `channel_axis`: a single value, or a constant of that rank with
/// the channels on that axis and 1 on every other (a constant that varied
/// along another axis of the same length must not pass for one).
fn per_channel(
    value: &Tensor,
    channel_axis: usize,
    rank: usize,
    channels: usize,
) -> TractResult<Option<Arc<Tensor>>> {
    if value.datum_type() != f32::datum_type() {
        return Ok(None);
    }
    let values = values::<f32>(value)?;
    if values.len() == 1 {
        return Ok(Some(tensor1(&vec![values[0]; channels]).into_arc_tensor()));
    }
    let on_channel_axis = value.rank() == rank
        && value
            .shape()
            .iter()
            .enumerate()
            .all(|(axis, &d)| d == if axis == channel_axis { channels } else { 1 });
    Ok(on_channel_axis.then(|| tensor1(values).into_arc_tensor()))
}

/// `value` as one f32, if all its elements are equal.
fn scalar(value: &Tensor) -> TractResult<Option<f32>> {
    let values = values::<f32>(value)?;
    match values.first() {
        Some(&first) if values.iter().all(|&v| v.to_bits() == first.to_bits()) => Ok(Some(first)),
        _ => Ok(None),
    }
}

fn values<T: Datum>(tensor: &Tensor) -> TractResult<&[T]> {
    tensor.try_as_plain_ram()?.as_slice::<T>()
}
