//! The depthwise convolution of a separable convolution, with the
//! dequantization and Relu before it and the u8 quantization after it.

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cast::Cast;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec};
use tract_onnx::tract_core::ops::nn::DataFormat;

use super::{
    check_input, dequantize_prologue, load_dequantized_row, load_float_row, read_once,
    replace_with_stage, scalar, single_consumer_with_constant, unary_with_constant, values,
    with_widest_vectors, F32Bits, StageFusion, StageInput, VectorJob,
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
/// a `[C, H, W]` or `[N, C, H, W]` tensor, with its optional prologue and
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
        check_input("depthwise", &input, self.input.datum_type(), &self.shape)?;
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
        debug_assert!((0.0..=255.0).contains(&low) && (low..=255.0).contains(&high));
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
        let relu = self.input_relu;
        match &self.input {
            StageInput::Float => {
                let input = values::<f32>(input)?;
                self.run_planes(input, output, taps, bias, |_, src, dst| {
                    load_float_row(src, dst, relu)
                })
            }
            StageInput::Dequantize { scale, shift } => {
                let (scale, shift) = (values::<f32>(scale)?, values::<f32>(shift)?);
                let input = values::<i32>(input)?;
                self.run_planes(input, output, taps, bias, |c, src, dst| {
                    load_dequantized_row(src, dst, scale[c], shift[c], relu)
                })
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
        // Planes are walked as `N*C` planes of channel `index % C`, so a
        // batch plan (`Encoder::batch_encoder`) takes the stage too.
        DataFormat::NCHW if shape.len() == 4 => 1,
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
    // The convolution's own bias: one value per output channel.
    let bias = match values::<f32>(&bias)? {
        [single] => tensor1(&vec![*single; channels]).into_arc_tensor(),
        all if all.len() == channels && bias.rank() == 1 => bias.clone(),
        _ => return Ok(None),
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
    let (input, reads) = dequantize_prologue(model, reads, channel_axis)?;

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

    /// How to build the int8 graph's separable step for one test.
    #[derive(Clone)]
    struct Shape {
        /// `[1, C, H, W]` in NCHW rather than `[C, H, W]` in CHW.
        batch: bool,
        width: usize,
        stride: usize,
        /// The rescale's constant varies along the width axis instead of
        /// the channel axis (possible only where `width == C`).
        scale_along_width: bool,
    }

    const PLAIN: Shape = Shape {
        batch: false,
        width: W,
        stride: 1,
        scale_along_width: false,
    };

    impl Shape {
        fn dims(&self) -> TVec<usize> {
            let mut dims: TVec<usize> = tvec![C, H, self.width];
            if self.batch {
                dims.insert(0, 1);
            }
            dims
        }

        /// A constant of the activations' rank with `values` on `axis`
        /// (counted from the end: 3 = channels, 1 = width).
        fn constant(&self, values: &[f32], axis_from_end: usize) -> TractResult<Tensor> {
            let rank = self.dims().len();
            let mut shape = tvec![1; rank];
            shape[rank - axis_from_end] = values.len();
            tensor1(values).into_shape(&shape)
        }

        fn scalar(&self, value: f32) -> TractResult<Tensor> {
            self.constant(&[value], 3)
        }

        fn depthwise(&self, model: &mut TypedModel, x: OutletId) -> TractResult<OutletId> {
            let conv = Conv {
                pool_spec: PoolSpec {
                    data_format: if self.batch {
                        DataFormat::NCHW
                    } else {
                        DataFormat::CHW
                    },
                    kernel_shape: tvec![3, 3],
                    padding: PaddingSpec::Explicit(tvec![1, 1], tvec![1, 1]),
                    dilations: None,
                    strides: Some(tvec![self.stride, self.stride]),
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

        /// The int8 graph's shape: i32 -> Cast, Mul, Add, Relu -> depthwise
        /// -> Max, Min, Cast u8.
        fn integer_graph(&self) -> TractResult<TypedModel> {
            let mut model = TypedModel::default();
            let x = model.add_source("x", i32::fact(self.dims()))?;
            let x = model.wire_node("cast", Cast::new(f32::datum_type()), &[x])?[0];
            let scale = if self.scale_along_width {
                self.constant(&spread(self.width, 3, 0.01), 1)?
            } else {
                self.constant(&spread(C, 3, 0.01), 3)?
            };
            let scale = model.add_const("scale.value", scale)?;
            let x = model.wire_node("rescale", math::mul(), &[x, scale])?[0];
            let shift = model.add_const("shift.value", self.constant(&spread(C, 4, 1.0), 3)?)?;
            let x = model.wire_node("shift", math::add(), &[x, shift])?[0];
            let zero = model.add_const("zero", self.scalar(0.0)?)?;
            let x = model.wire_node("relu", math::max(), &[x, zero])?[0];
            let x = self.depthwise(&mut model, x)?;
            let low = model.add_const("low", self.scalar(0.0)?)?;
            let x = model.wire_node("clip.min", math::max(), &[x, low])?[0];
            let high = model.add_const("high", self.scalar(255.0)?)?;
            let x = model.wire_node("clip.max", math::min(), &[x, high])?[0];
            let x = model.wire_node("quantize", Cast::new(u8::datum_type()), &[x])?[0];
            model.select_output_outlets(&[x])?;
            Ok(model)
        }

        fn integer_input(&self) -> TractResult<Tensor> {
            let values: Vec<i32> = spread(self.dims().iter().product(), 5, 40_000.0)
                .iter()
                .map(|&v| v as i32)
                .collect();
            tensor1(&values).into_shape(&self.dims())
        }
    }

    fn run(model: TypedModel, input: Tensor) -> TractResult<TVec<Tensor>> {
        let plan = model.into_optimized()?.into_runnable()?;
        let outputs = plan.run(tvec!(input.into_tvalue()))?;
        Ok(outputs.into_iter().map(|o| o.into_tensor()).collect())
    }

    /// Fuses a copy of `stock`, checks what was fused, and compares every
    /// output of the two on `input`: u8 outputs within one (summing the nine
    /// taps in another order may move a value across an integer boundary,
    /// and truncation then moves it by one) and rarely off; f32 outputs to
    /// rounding.
    fn fuse_and_compare(
        stock: &TypedModel,
        input: Tensor,
        expected_fusion: (usize, usize, usize),
    ) -> TractResult<()> {
        let mut fused = stock.clone();
        let fusion = fuse_stages(&mut fused)?;
        assert_eq!(
            (
                fusion.depthwise,
                fusion.depthwise_dequantize,
                fusion.depthwise_quantize
            ),
            expected_fusion
        );
        let expected = run(stock.clone(), input.clone())?;
        let actual = run(fused, input)?;
        assert_eq!(expected.len(), actual.len());
        for (e, a) in expected.iter().zip(&actual) {
            assert_eq!(e.shape(), a.shape());
            if e.datum_type() == u8::datum_type() {
                let (e, a) = (values::<u8>(e)?, values::<u8>(a)?);
                let differing = e.iter().zip(a).filter(|(x, y)| x != y).count();
                let worst = e.iter().zip(a).map(|(&x, &y)| x.abs_diff(y)).max();
                assert!(worst <= Some(1), "worst difference {worst:?}");
                assert!(
                    differing * 100 <= e.len(),
                    "{differing} of {} differ",
                    e.len()
                );
                // Not a vacuous comparison: the clip leaves a spread.
                assert!(e.contains(&0) && e.iter().any(|&v| v > 100));
            } else {
                for (i, (x, y)) in values::<f32>(e)?.iter().zip(values::<f32>(a)?).enumerate() {
                    assert!(
                        (x - y).abs() <= 1e-5 * (1.0 + x.abs()),
                        "element {i}: {x} vs {y}"
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn integer_stage_matches_the_graph_it_replaces() -> TractResult<()> {
        for shape in [
            PLAIN,
            Shape {
                batch: true,
                ..PLAIN
            },
        ] {
            let stock = shape.integer_graph()?;
            fuse_and_compare(&stock, shape.integer_input()?, (1, 1, 1))?;
            let mut fused = stock.clone();
            fuse_stages(&mut fused)?;
            assert_eq!(
                fused.nodes().iter().filter(|n| n.op_is::<Cast>()).count(),
                0
            );
        }
        Ok(())
    }

    #[test]
    fn float_stage_matches_tract_at_every_border() -> TractResult<()> {
        let mut stock = TypedModel::default();
        let x = stock.add_source("x", f32::fact([C, H, W]))?;
        let y = PLAIN.depthwise(&mut stock, x)?;
        stock.select_output_outlets(&[y])?;
        let input = tensor1(&spread(C * H * W, 6, 2.0)).into_shape(&[C, H, W])?;
        fuse_and_compare(&stock, input, (1, 0, 0))
    }

    #[test]
    fn leaves_other_convolutions_alone() -> TractResult<()> {
        let mut strided = Shape { stride: 2, ..PLAIN }.integer_graph()?;
        assert_eq!(fuse_stages(&mut strided)?.depthwise, 0);
        Ok(())
    }

    #[test]
    fn a_rescale_along_another_axis_is_not_taken_for_per_channel() -> TractResult<()> {
        // Width == channels: a [1, 1, C] constant has C values, on the
        // wrong axis. The stage must read the rescaled f32 instead.
        let shape = Shape {
            width: C,
            scale_along_width: true,
            ..PLAIN
        };
        fuse_and_compare(&shape.integer_graph()?, shape.integer_input()?, (1, 0, 1))
    }

    /// Adds `name`'s output to the model's outputs: something else reads it.
    fn also_output(model: &mut TypedModel, name: &str) -> TractResult<()> {
        let outlet = OutletId::new(model.node_by_name(name)?.id, 0);
        let mut outputs = model.output_outlets()?.to_vec();
        outputs.push(outlet);
        model.select_output_outlets(&outputs)
    }

    #[test]
    fn leaves_values_that_something_else_reads() -> TractResult<()> {
        // The rescaled activations: the stage reads them instead of the i32.
        let mut shared = PLAIN.integer_graph()?;
        also_output(&mut shared, "shift")?;
        fuse_and_compare(&shared, PLAIN.integer_input()?, (1, 0, 1))?;

        // The clipped-below output: the stage writes f32 and leaves the
        // rest of the clip and the cast to tract.
        let mut shared = PLAIN.integer_graph()?;
        also_output(&mut shared, "clip.min")?;
        fuse_and_compare(&shared, PLAIN.integer_input()?, (1, 1, 0))
    }
}
