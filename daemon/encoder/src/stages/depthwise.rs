//! The depthwise convolution of a separable convolution, with the
//! dequantization and Relu before it and the u8 quantization after it.

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cast::Cast;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec};
use tract_onnx::tract_core::ops::nn::DataFormat;

use super::{
    dequantize_prologue, per_channel, read_once, replace_with_stage, scalar,
    single_consumer_with_constant, unary_with_constant, values, with_widest_vectors, F32Bits,
    RowLoader, StageFusion, StageInput, VectorJob,
};

/// What the stage writes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum StageOutput {
    Float,
    /// `value.max(low).min(high) as u8`: the next integer convolution's input.
    QuantizeU8 {
        low: F32Bits,
        high: F32Bits,
    },
}

/// One depthwise 3x3 convolution (stride 1, one pixel of zero padding) over
/// a `[C, H, W]` or `[1, C, H, W]` tensor, with its optional prologue and
/// epilogue.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DepthwiseStage {
    shape: TVec<usize>,
    /// `[C, 9]` row-major 3x3 filters.
    taps: Arc<Tensor>,
    /// `[C]`.
    bias: Arc<Tensor>,
    input: StageInput,
    /// Relu applied to the input before the convolution (and so before the
    /// zero padding, which a Relu leaves unchanged).
    input_relu: bool,
    output: StageOutput,
}

impl DepthwiseStage {
    fn channels(&self) -> usize {
        self.shape[self.shape.len() - 3]
    }
    fn height(&self) -> usize {
        self.shape[self.shape.len() - 2]
    }
    fn width(&self) -> usize {
        self.shape[self.shape.len() - 1]
    }
    fn output_datum_type(&self) -> DatumType {
        match self.output {
            StageOutput::Float => f32::datum_type(),
            StageOutput::QuantizeU8 { .. } => u8::datum_type(),
        }
    }
}

impl Op for DepthwiseStage {
    fn name(&self) -> StaticName {
        "DermascopeDepthwiseStage".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let output = match self.output {
            StageOutput::Float => "f32".to_string(),
            StageOutput::QuantizeU8 { low, high } => {
                format!("u8 clipped to [{}, {}]", low.get(), high.get())
            }
        };
        Ok(vec![format!(
            "shape {:?}, input {}{}, output {output}",
            self.shape,
            self.input.describe(),
            if self.input_relu { " + relu" } else { "" }
        )])
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for DepthwiseStage {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        ensure!(
            input.shape() == &*self.shape && input.datum_type() == self.input.datum_type(),
            "depthwise stage expects {:?} {:?}, got {:?} {:?}",
            self.input.datum_type(),
            self.shape,
            input.datum_type(),
            input.shape()
        );
        let output = match self.output {
            StageOutput::Float => {
                let mut output = Tensor::zero::<f32>(&self.shape)?;
                self.run(
                    &input,
                    output.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?,
                )?;
                output
            }
            StageOutput::QuantizeU8 { .. } => {
                let mut output = Tensor::zero::<u8>(&self.shape)?;
                self.run(&input, output.try_as_plain_ram_mut()?.as_slice_mut::<u8>()?)?;
                output
            }
        };
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for DepthwiseStage {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1, "depthwise stage has one input");
        ensure!(inputs[0].datum_type == self.input.datum_type());
        Ok(tvec!(self.output_datum_type().fact(&*self.shape)))
    }

    fn cost(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let points: usize = self.shape.iter().product();
        Ok(tvec!((Cost::FMA(f32::datum_type()), (points * 9).to_dim())))
    }

    as_op!();
}

/// Where one output row's values go.
trait StageSink: Copy + Send + Sync + Default {
    fn store(row: &[f32], out: &mut [Self], output: &StageOutput);
}

impl StageSink for f32 {
    #[inline(always)]
    fn store(row: &[f32], out: &mut [f32], _output: &StageOutput) {
        out.copy_from_slice(row);
    }
}

impl StageSink for u8 {
    #[inline(always)]
    fn store(row: &[f32], out: &mut [u8], output: &StageOutput) {
        let (low, high) = match output {
            StageOutput::QuantizeU8 { low, high } => (low.get(), high.get()),
            StageOutput::Float => (0.0, 255.0),
        };
        for (q, &v) in out.iter_mut().zip(row) {
            // The graph's Max, Min and truncating Cast, in order.
            let clipped = v.max(low).min(high);
            // SAFETY: `quantize_epilogue` only builds this stage with finite
            // 0 <= low <= high <= 255, and `max` maps NaN to `low`, so
            // `clipped` is finite and within u8; the unchecked conversion
            // truncates as the graph's cast does and, unlike `as`, vectorises.
            *q = unsafe { clipped.to_int_unchecked::<i32>() } as u8;
        }
    }
}

impl DepthwiseStage {
    fn run<S: StageSink>(&self, input: &Tensor, output: &mut [S]) -> TractResult<()> {
        let plane = self.height() * self.width();
        if plane == 0 || self.channels() == 0 {
            return Ok(());
        }
        let (taps, bias) = (values::<f32>(&self.taps)?, values::<f32>(&self.bias)?);
        match &self.input {
            StageInput::Float => {
                let loader = RowLoader::Float {
                    relu: self.input_relu,
                };
                let input = values::<f32>(input)?;
                self.run_planes(
                    input,
                    output,
                    taps,
                    bias,
                    |_, src: &[f32], dst: &mut [f32]| loader.load_f32(src, dst),
                )
            }
            StageInput::Dequantize { scale, shift } => {
                let loader = RowLoader::Dequantize {
                    scale: values::<f32>(scale)?,
                    shift: values::<f32>(shift)?,
                    relu: self.input_relu,
                };
                let input = values::<i32>(input)?;
                self.run_planes(
                    input,
                    output,
                    taps,
                    bias,
                    |c, src: &[i32], dst: &mut [f32]| loader.load_i32(c, src, dst),
                )
            }
        }
    }

    fn run_planes<T: Copy + Sync, S: StageSink>(
        &self,
        input: &[T],
        output: &mut [S],
        taps: &[f32],
        bias: &[f32],
        load: impl Fn(usize, &[T], &mut [f32]) + Sync,
    ) -> TractResult<()> {
        let plane = self.height() * self.width();
        let total = output.len();
        tract_linalg::multithread::par_chunks_mut(output, plane, total, |first, chunk| {
            with_widest_vectors(Planes {
                stage: self,
                first,
                chunk,
                input,
                taps,
                bias,
                load: &load,
            });
            Ok(())
        })
    }
}

/// The planes `first..` that `chunk` holds. `load` fills one row of channel
/// `c`'s padded input plane from one input row.
struct Planes<'a, T, S, L> {
    stage: &'a DepthwiseStage,
    first: usize,
    chunk: &'a mut [S],
    input: &'a [T],
    taps: &'a [f32],
    bias: &'a [f32],
    load: &'a L,
}

impl<T: Copy, S: StageSink, L: Fn(usize, &[T], &mut [f32])> VectorJob for Planes<'_, T, S, L> {
    #[inline(always)]
    fn run(self) {
        let Planes {
            stage,
            first,
            chunk,
            input,
            taps,
            bias,
            load,
        } = self;
        let (channels, height, width) = (stage.channels(), stage.height(), stage.width());
        let plane = height * width;
        let padded_width = width + 2;
        // The input plane with its zero border (and two spare zeros, which
        // the last row's discarded columns read), and the output plane at
        // the padded width; a chunk reuses both for all its planes.
        let mut padded = vec![0f32; (height + 2) * padded_width + 2];
        let mut sums = vec![0f32; height * padded_width];
        for (offset, out_plane) in chunk.chunks_mut(plane).enumerate() {
            let index = first + offset;
            let c = index % channels;
            let in_plane = &input[index * plane..(index + 1) * plane];
            for (y, src) in in_plane.chunks(width).enumerate() {
                let start = (y + 1) * padded_width + 1;
                load(c, src, &mut padded[start..start + width]);
            }
            let taps: &[f32; 9] = match taps[c * 9..c * 9 + 9].try_into() {
                Ok(taps) => taps,
                Err(_) => unreachable!("a 9-element slice converts to [f32; 9]"),
            };
            convolve_plane(&mut sums, &padded, padded_width, taps, bias[c]);
            for (out_row, sum_row) in out_plane.chunks_mut(width).zip(sums.chunks(padded_width)) {
                S::store(&sum_row[..width], out_row, &stage.output);
            }
        }
    }
}

/// One output plane from its zero-padded input plane. Output point `(y, x)`
/// is `sums[y * pw + x]`: computing the two columns per row that are then
/// discarded makes the whole plane one loop over equal-length slices, which
/// the compiler vectorises however narrow the plane is (the middle of the
/// network is 16 pixels wide).
#[inline(always)]
fn convolve_plane(sums: &mut [f32], padded: &[f32], pw: usize, taps: &[f32; 9], bias: f32) {
    let n = sums.len();
    let at = |offset: usize| &padded[offset..offset + n];
    let (a0, a1, a2) = (at(0), at(1), at(2));
    let (b0, b1, b2) = (at(pw), at(pw + 1), at(pw + 2));
    let (c0, c1, c2) = (at(2 * pw), at(2 * pw + 1), at(2 * pw + 2));
    for x in 0..n {
        // Three short sums instead of one chain of nine additions: each
        // addition waits on the last, so the chain, not the arithmetic,
        // would set the speed.
        let left = bias + taps[0] * a0[x] + taps[3] * b0[x] + taps[6] * c0[x];
        let centre = taps[1] * a1[x] + taps[4] * b1[x] + taps[7] * c1[x];
        let right = taps[2] * a2[x] + taps[5] * b2[x] + taps[8] * c2[x];
        sums[x] = left + centre + right;
    }
}

/// Replaces every 3x3, stride 1, pad 1 f32 depthwise convolution by a
/// [`DepthwiseStage`], taking in the integer dequantization and Relu before
/// it and the clip and u8 cast after it where the graph has them and nothing
/// else reads their intermediate values.
pub(super) fn fuse(model: &mut TypedModel, fusion: &mut StageFusion) -> TractResult<()> {
    let convolutions: Vec<usize> = model
        .nodes()
        .iter()
        .filter(|node| node.op_is::<Conv>())
        .map(|node| node.id)
        .collect();
    for id in convolutions {
        let Some(plan) = plan_stage(model, id)? else {
            continue;
        };
        fusion.depthwise += 1;
        fusion.depthwise_dequantize +=
            matches!(plan.op.input, StageInput::Dequantize { .. }) as usize;
        fusion.depthwise_quantize +=
            matches!(plan.op.output, StageOutput::QuantizeU8 { .. }) as usize;
        let name = model.node(id).name.clone();
        replace_with_stage(model, name, plan.op, plan.reads, plan.replaces)?;
    }
    Ok(())
}

struct StagePlan {
    op: DepthwiseStage,
    /// The outlet the stage reads.
    reads: OutletId,
    /// The outlet whose consumers the stage's output takes over.
    replaces: OutletId,
}

fn plan_stage(model: &TypedModel, id: usize) -> TractResult<Option<StagePlan>> {
    let node = model.node(id);
    let Some(conv) = node.op_as::<Conv>() else {
        return Ok(None);
    };
    if node.inputs.len() != 3 || conv.q_params.is_some() {
        return Ok(None);
    }
    let spec = &conv.pool_spec;
    let input_fact = model.outlet_fact(node.inputs[0])?;
    let Some(shape) = input_fact.shape.as_concrete() else {
        return Ok(None);
    };
    let channel_axis = match spec.data_format {
        DataFormat::NCHW if shape.len() == 4 && shape[0] == 1 => 1,
        DataFormat::CHW if shape.len() == 3 => 0,
        _ => return Ok(None),
    };
    let channels = shape[channel_axis];
    let ones = |v: &Option<TVec<usize>>| v.as_ref().is_none_or(|v| v.iter().all(|&s| s == 1));
    let pad_one = match &spec.padding {
        PaddingSpec::Explicit(before, after) => before.iter().chain(after.iter()).all(|&p| p == 1),
        PaddingSpec::SameUpper | PaddingSpec::SameLower => true,
        _ => false,
    };
    if input_fact.datum_type != f32::datum_type()
        || spec.kernel_shape.as_slice() != [3, 3]
        || !ones(&spec.strides)
        || !ones(&spec.dilations)
        || !pad_one
        || conv.kernel_fmt != KernelFormat::OIHW
        || conv.group != channels
        || spec.input_channels != channels
        || spec.output_channels != channels
    {
        return Ok(None);
    }
    let (Some(kernel), Some(bias)) = (
        model.outlet_fact(node.inputs[1])?.konst.clone(),
        model.outlet_fact(node.inputs[2])?.konst.clone(),
    ) else {
        return Ok(None);
    };
    if kernel.datum_type() != f32::datum_type() || kernel.len() != channels * 9 {
        return Ok(None);
    }
    let Some(bias) = per_channel(&bias, channels)? else {
        return Ok(None);
    };
    let taps = kernel
        .as_ref()
        .clone()
        .into_shape(&[channels, 9])?
        .into_arc_tensor();

    // Prologue: [Cast i32 -> f32, Mul scale, Add shift,] [Max 0,] conv.
    let mut reads = node.inputs[0];
    let mut input_relu = false;
    if let Some(x) = unary_with_constant(model, reads, "Max")? {
        if values::<f32>(&x.constant)?.iter().all(|&v| v == 0.0) {
            input_relu = true;
            reads = x.other;
        }
    }
    let (input, reads) = dequantize_prologue(model, reads, channels)?;

    let conv_output = OutletId::new(id, 0);
    let (output, replaces) = match quantize_epilogue(model, conv_output)? {
        Some((low, high, cast)) => (StageOutput::QuantizeU8 { low, high }, cast),
        None => (StageOutput::Float, conv_output),
    };
    Ok(Some(StagePlan {
        op: DepthwiseStage {
            shape: shape.into(),
            taps,
            bias,
            input,
            input_relu,
            output,
        },
        reads,
        replaces,
    }))
}

/// The clip bounds and the cast's outlet, if `conv_output` is read only by
/// `Max(low)`, then `Min(high)`, then a cast to u8, with
/// `0 <= low <= high <= 255` (the range the store's conversion relies on).
fn quantize_epilogue(
    model: &TypedModel,
    conv_output: OutletId,
) -> TractResult<Option<(F32Bits, F32Bits, OutletId)>> {
    let Some(low) = single_consumer_with_constant(model, conv_output, "Max")? else {
        return Ok(None);
    };
    let Some(high) = single_consumer_with_constant(model, low.outlet, "Min")? else {
        return Ok(None);
    };
    if !read_once(model, high.outlet)? {
        return Ok(None);
    }
    let cast = model.node(model.outlet_successors(high.outlet)[0].node);
    if cast.op_as::<Cast>().map(|c| c.to) != Some(u8::datum_type()) {
        return Ok(None);
    }
    let (Some(low), Some(high)) = (scalar(&low.constant)?, scalar(&high.constant)?) else {
        return Ok(None);
    };
    if !(0.0..=255.0).contains(&low) || !(low..=255.0).contains(&high) {
        return Ok(None);
    }
    Ok(Some((
        F32Bits::new(low),
        F32Bits::new(high),
        OutletId::new(cast.id, 0),
    )))
}

#[cfg(test)]
mod tests {
    use super::super::fuse_stages;
    use super::*;
    use tract_onnx::tract_core::ops::cnn::PoolSpec;
    use tract_onnx::tract_core::ops::math;

    const C: usize = 5;
    const H: usize = 7;
    const W: usize = 6;

    /// A small deterministic spread of values (no rand dependency).
    fn spread(len: usize, seed: u32, scale: f32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state % 2001) as f32 / 1000.0 * scale - scale
            })
            .collect()
    }

    fn depthwise(model: &mut TypedModel, x: OutletId, stride: usize) -> TractResult<OutletId> {
        let conv = Conv {
            pool_spec: PoolSpec {
                data_format: DataFormat::CHW,
                kernel_shape: tvec![3, 3],
                padding: PaddingSpec::Explicit(tvec![1, 1], tvec![1, 1]),
                dilations: None,
                strides: Some(tvec![stride, stride]),
                input_channels: C,
                output_channels: C,
            },
            kernel_fmt: KernelFormat::OIHW,
            group: C,
            q_params: None,
        };
        let kernel = tensor1(&spread(C * 9, 1, 0.8)).into_shape(&[C, 1, 3, 3])?;
        let kernel = model.add_const("kernel", kernel)?;
        let bias = model.add_const("bias", tensor1(&spread(C, 2, 3.0)))?;
        Ok(model.wire_node("depthwise", conv, &[x, kernel, bias])?[0])
    }

    fn channel_constant(
        model: &mut TypedModel,
        name: &str,
        values: &[f32],
    ) -> TractResult<OutletId> {
        let value = tensor1(values).into_shape(&[values.len(), 1, 1])?;
        model.add_const(name, value)
    }

    fn binary(
        model: &mut TypedModel,
        name: &str,
        op: tract_onnx::tract_core::ops::binary::TypedBinOp,
        x: OutletId,
        constant: OutletId,
    ) -> TractResult<OutletId> {
        Ok(model.wire_node(name, op, &[x, constant])?[0])
    }

    /// The int8 graph's shape: i32 -> Cast, Mul, Add, Relu -> depthwise ->
    /// Max, Min, Cast u8.
    fn integer_stage_graph(stride: usize) -> TractResult<TypedModel> {
        let mut model = TypedModel::default();
        let x = model.add_source("x", i32::fact([C, H, W]))?;
        let x = model.wire_node("cast", Cast::new(f32::datum_type()), &[x])?[0];
        let scale = channel_constant(&mut model, "scale.value", &spread(C, 3, 0.01))?;
        let x = binary(&mut model, "rescale", math::mul(), x, scale)?;
        let shift = channel_constant(&mut model, "shift.value", &spread(C, 4, 1.0))?;
        let x = binary(&mut model, "shift", math::add(), x, shift)?;
        let zero = model.add_const("zero", tensor3(&[[[0f32]]]))?;
        let x = binary(&mut model, "relu", math::max(), x, zero)?;
        let x = depthwise(&mut model, x, stride)?;
        let low = model.add_const("low", tensor3(&[[[0f32]]]))?;
        let x = binary(&mut model, "clip.min", math::max(), x, low)?;
        let high = model.add_const("high", tensor3(&[[[255f32]]]))?;
        let x = binary(&mut model, "clip.max", math::min(), x, high)?;
        let x = model.wire_node("quantize", Cast::new(u8::datum_type()), &[x])?[0];
        model.select_output_outlets(&[x])?;
        Ok(model)
    }

    fn run(model: TypedModel, input: Tensor) -> TractResult<Tensor> {
        let plan = model.into_optimized()?.into_runnable()?;
        let mut outputs = plan.run(tvec!(input.into_tvalue()))?;
        Ok(outputs.remove(0).into_tensor())
    }

    fn integer_input() -> Tensor {
        let values: Vec<i32> = spread(C * H * W, 5, 40_000.0)
            .iter()
            .map(|&v| v as i32)
            .collect();
        tensor1(&values)
            .into_shape(&[C, H, W])
            .expect("C*H*W values")
    }

    #[test]
    fn integer_stage_matches_the_graph_it_replaces() -> TractResult<()> {
        let stock = integer_stage_graph(1)?;
        let mut fused = stock.clone();
        let fusion = fuse_stages(&mut fused)?;
        assert_eq!(
            fusion,
            StageFusion {
                depthwise: 1,
                depthwise_dequantize: 1,
                depthwise_quantize: 1,
                ..StageFusion::default()
            }
        );
        assert_eq!(
            fused.nodes().iter().filter(|n| n.op_is::<Cast>()).count(),
            0
        );
        let expected = run(stock, integer_input())?;
        let actual = run(fused, integer_input())?;
        assert_eq!(actual.shape(), expected.shape());
        let (expected, actual) = (values::<u8>(&expected)?, values::<u8>(&actual)?);
        // Summing the nine taps in another order may move a value across
        // an integer boundary, and truncation then moves it by one.
        let differing = expected.iter().zip(actual).filter(|(e, a)| e != a).count();
        let worst = expected
            .iter()
            .zip(actual)
            .map(|(&e, &a)| (e as i32 - a as i32).abs())
            .max();
        assert!(worst <= Some(1), "worst difference {worst:?}");
        assert!(
            differing * 100 <= expected.len(),
            "{differing} of {} differ",
            expected.len()
        );
        // Not a vacuous comparison: the clip leaves a spread of values.
        assert!(expected.contains(&0) && expected.iter().any(|&v| v > 100));
        Ok(())
    }

    #[test]
    fn float_stage_matches_tract_at_every_border() -> TractResult<()> {
        let mut stock = TypedModel::default();
        let x = stock.add_source("x", f32::fact([C, H, W]))?;
        let y = depthwise(&mut stock, x, 1)?;
        stock.select_output_outlets(&[y])?;
        let mut fused = stock.clone();
        let fusion = fuse_stages(&mut fused)?;
        assert_eq!(
            (
                fusion.depthwise,
                fusion.depthwise_dequantize,
                fusion.depthwise_quantize
            ),
            (1, 0, 0)
        );
        let input = tensor1(&spread(C * H * W, 6, 2.0)).into_shape(&[C, H, W])?;
        let expected = run(stock, input.clone())?;
        let actual = run(fused, input)?;
        for (i, (e, a)) in values::<f32>(&expected)?
            .iter()
            .zip(values::<f32>(&actual)?)
            .enumerate()
        {
            assert!(
                (e - a).abs() <= 1e-5 * (1.0 + e.abs()),
                "element {i}: {e} vs {a}"
            );
        }
        Ok(())
    }

    #[test]
    fn leaves_other_convolutions_and_shared_values_alone() -> TractResult<()> {
        // Stride 2 is not a stage.
        let mut strided = integer_stage_graph(2)?;
        assert_eq!(fuse_stages(&mut strided)?.depthwise, 0);

        // When something else reads the rescaled activations, the stage
        // must not swallow them: it then reads them instead of the i32.
        let mut shared = integer_stage_graph(1)?;
        let rescaled = shared
            .node_by_name("shift")
            .map(|node| OutletId::new(node.id, 0))?;
        let quantized = shared.output_outlets()?[0];
        shared.select_output_outlets(&[quantized, rescaled])?;
        let stock = shared.clone();
        let fusion = fuse_stages(&mut shared)?;
        assert_eq!(
            (
                fusion.depthwise,
                fusion.depthwise_dequantize,
                fusion.depthwise_quantize
            ),
            (1, 0, 1)
        );
        let expected = run(stock, integer_input())?;
        let actual = run(shared, integer_input())?;
        let worst = values::<u8>(&expected)?
            .iter()
            .zip(values::<u8>(&actual)?)
            .map(|(&e, &a)| (e as i32 - a as i32).abs())
            .max();
        assert!(worst <= Some(1));
        Ok(())
    }
}
