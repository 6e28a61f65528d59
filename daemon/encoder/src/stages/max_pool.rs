//! A 2-D max pool, with the dequantization before it.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cnn::MaxPool;
use tract_onnx::tract_core::ops::nn::DataFormat;

use super::{
    check_input, dequantize_prologue, load_dequantized_row, load_float_row, replace_with_stage,
    values, with_widest_vectors, StageFusion, StageInput, VectorJob,
};

/// A max pool over the two last axes of a `[C, H, W]` or `[N, C, H, W]`
/// tensor; padded positions never win (they are not part of the window),
/// and the maximum starts from `f32::MIN`, as tract's does.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MaxPoolStage {
    input_shape: TVec<usize>,
    output_shape: TVec<usize>,
    kernel: [usize; 2],
    strides: [usize; 2],
    pad_before: [usize; 2],
    input: StageInput,
}

impl MaxPoolStage {
    fn channels(&self) -> usize {
        self.input_shape[self.input_shape.len() - 3]
    }
    fn input_hw(&self) -> [usize; 2] {
        let rank = self.input_shape.len();
        [self.input_shape[rank - 2], self.input_shape[rank - 1]]
    }
    fn output_hw(&self) -> [usize; 2] {
        let rank = self.output_shape.len();
        [self.output_shape[rank - 2], self.output_shape[rank - 1]]
    }

    /// The input positions along one axis that output position `o` covers.
    fn window(&self, axis: usize, o: usize, len: usize) -> std::ops::Range<usize> {
        let start = (o * self.strides[axis]) as isize - self.pad_before[axis] as isize;
        let end = start + self.kernel[axis] as isize;
        (start.max(0) as usize)..(end.clamp(0, len as isize) as usize)
    }
}

impl Op for MaxPoolStage {
    fn name(&self) -> StaticName {
        "DermascopeMaxPoolStage".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{:?} -> {:?}, kernel {:?}, strides {:?}, pad before {:?}, input {}",
            self.input_shape,
            self.output_shape,
            self.kernel,
            self.strides,
            self.pad_before,
            self.input.describe()
        )])
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for MaxPoolStage {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        check_input(
            "max pool",
            &input,
            self.input.datum_type(),
            &self.input_shape,
        )?;
        let mut output = Tensor::zero::<f32>(&self.output_shape)?;
        {
            let mut view = output.try_as_plain_ram_mut()?;
            let out = view.as_slice_mut::<f32>()?;
            match &self.input {
                StageInput::Float => self.run(values::<f32>(&input)?, out, |_, src, dst| {
                    load_float_row(src, dst, false)
                })?,
                StageInput::Dequantize { scale, shift } => {
                    let (scale, shift) = (values::<f32>(scale)?, values::<f32>(shift)?);
                    self.run(values::<i32>(&input)?, out, |c, src, dst| {
                        load_dequantized_row(src, dst, scale[c], shift[c], false)
                    })?
                }
            }
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for MaxPoolStage {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1, "max pool stage has one input");
        ensure!(inputs[0].datum_type == self.input.datum_type());
        Ok(tvec!(f32::fact(&*self.output_shape)))
    }

    as_op!();
}

impl MaxPoolStage {
    fn run<T: Copy + Sync>(
        &self,
        input: &[T],
        output: &mut [f32],
        load: impl Fn(usize, &[T], &mut [f32]) + Sync,
    ) -> TractResult<()> {
        let ([in_h, in_w], [out_h, out_w]) = (self.input_hw(), self.output_hw());
        let (in_plane, out_plane) = (in_h * in_w, out_h * out_w);
        if in_plane == 0 || out_plane == 0 || self.channels() == 0 {
            return Ok(());
        }
        let total = input.len();
        tract_linalg::multithread::par_chunks_mut(output, out_plane, total, |first, chunk| {
            with_widest_vectors(Pools {
                stage: self,
                first,
                chunk,
                input,
                load: &load,
            });
            Ok(())
        })
    }
}

/// The output planes `first..` that `chunk` holds.
struct Pools<'a, T, L> {
    stage: &'a MaxPoolStage,
    first: usize,
    chunk: &'a mut [f32],
    input: &'a [T],
    load: &'a L,
}

impl<T: Copy, L: Fn(usize, &[T], &mut [f32])> VectorJob for Pools<'_, T, L> {
    #[inline(always)]
    fn run(self) {
        let Pools {
            stage,
            first,
            chunk,
            input,
            load,
        } = self;
        let ([in_h, in_w], [out_h, out_w]) = (stage.input_hw(), stage.output_hw());
        let (in_plane, out_plane) = (in_h * in_w, out_h * out_w);
        let channels = stage.channels();
        let kernel_w = stage.kernel[1];
        // One channel's input, as f32; the column maxima of one output row's
        // window rows; and the maxima of each run of `kernel_w` columns.
        // Reused for every plane.
        let mut plane = vec![0f32; in_plane];
        let mut columns = vec![0f32; in_w];
        let mut runs = vec![0f32; (in_w + 1).saturating_sub(kernel_w)];
        for (offset, out) in chunk.chunks_mut(out_plane).enumerate() {
            let index = first + offset;
            let src = &input[index * in_plane..(index + 1) * in_plane];
            for (src_row, row) in src.chunks(in_w).zip(plane.chunks_mut(in_w)) {
                load(index % channels, src_row, row);
            }
            for (oy, out_row) in out.chunks_mut(out_w).enumerate() {
                columns.fill(f32::MIN);
                for y in stage.window(0, oy, in_h) {
                    let row = &plane[y * in_w..(y + 1) * in_w];
                    for (m, &v) in columns.iter_mut().zip(row) {
                        *m = m.max(v);
                    }
                }
                // Maxima of every run of `kernel_w` columns, vectorised over
                // the row; each output then picks one run, strided. Only the
                // windows that padding cuts short are folded one by one.
                let run_count = runs.len();
                runs.copy_from_slice(&columns[..run_count]);
                for j in 1..kernel_w {
                    for (m, &v) in runs.iter_mut().zip(&columns[j..]) {
                        *m = m.max(v);
                    }
                }
                for (ox, o) in out_row.iter_mut().enumerate() {
                    let window = stage.window(1, ox, in_w);
                    *o = if window.len() == kernel_w {
                        runs[window.start]
                    } else {
                        columns[window].iter().fold(f32::MIN, |m, &v| m.max(v))
                    };
                }
            }
        }
    }
}

/// Replaces every 2-D f32 max pool (no index output, no dilation) by a
/// [`MaxPoolStage`], taking in the integer dequantization before it where
/// the graph has it and nothing else reads its intermediate values.
pub(super) fn fuse(model: &mut TypedModel, fusion: &mut StageFusion) -> TractResult<()> {
    let pools: Vec<usize> = model
        .nodes()
        .iter()
        .filter(|node| node.op_is::<MaxPool>())
        .map(|node| node.id)
        .collect();
    for id in pools {
        let Some((op, reads)) = plan_stage(model, id)? else {
            continue;
        };
        fusion.max_pool += 1;
        fusion.max_pool_dequantize += matches!(op.input, StageInput::Dequantize { .. }) as usize;
        let name = model.node(id).name.clone();
        replace_with_stage(model, name, op, reads, OutletId::new(id, 0))?;
    }
    Ok(())
}

fn plan_stage(model: &TypedModel, id: usize) -> TractResult<Option<(MaxPoolStage, OutletId)>> {
    let node = model.node(id);
    let Some(pool) = node.op_as::<MaxPool>() else {
        return Ok(None);
    };
    if node.inputs.len() != 1 {
        return Ok(None);
    }
    let spec = &pool.pool_spec;
    let input_fact = model.outlet_fact(node.inputs[0])?;
    let output_fact = model.outlet_fact(OutletId::new(id, 0))?;
    let (Some(input_shape), Some(output_shape)) = (
        input_fact.shape.as_concrete(),
        output_fact.shape.as_concrete(),
    ) else {
        return Ok(None);
    };
    let layout_fits = match spec.data_format {
        // Planes are walked as `N*C` planes of channel `index % C`.
        DataFormat::NCHW => input_shape.len() == 4,
        DataFormat::CHW => input_shape.len() == 3,
        _ => false,
    };
    let ones = |v: &Option<TVec<usize>>| v.as_ref().is_none_or(|v| v.iter().all(|&s| s == 1));
    if !layout_fits
        || pool.with_index_outputs.is_some()
        || node.outputs.len() != 1
        || input_fact.datum_type != f32::datum_type()
        || spec.kernel_shape.len() != 2
        || !ones(&spec.dilations)
    {
        return Ok(None);
    }
    let rank = input_shape.len();
    let hw = [input_shape[rank - 2], input_shape[rank - 1]];
    // tract's own padding arithmetic, so that the windows are the graph's.
    let padding = spec.computed_padding(&hw);
    let strides = spec.strides();
    let op = MaxPoolStage {
        input_shape: input_shape.into(),
        output_shape: output_shape.into(),
        kernel: [spec.kernel_shape[0], spec.kernel_shape[1]],
        strides: [strides[0], strides[1]],
        pad_before: [padding[0].pad_before, padding[1].pad_before],
        input: StageInput::Float,
    };
    let expected_hw = [padding[0].convoluted, padding[1].convoluted];
    if op.output_hw() != expected_hw
        || op.output_shape[..rank - 2] != op.input_shape[..rank - 2]
        // Every window keeps at least one input position.
        || (0..2).any(|axis| {
            let last_start = (expected_hw[axis].max(1) - 1) * op.strides[axis];
            padding[axis].pad_before >= op.kernel[axis]
                || padding[axis].pad_after >= op.kernel[axis]
                || last_start >= hw[axis] + padding[axis].pad_before
        })
    {
        return Ok(None);
    }
    let (input, reads) = dequantize_prologue(model, node.inputs[0], rank - 3)?;
    Ok(Some((MaxPoolStage { input, ..op }, reads)))
}

#[cfg(test)]
mod tests {
    use super::super::fuse_stages;
    use super::*;
    use tract_onnx::tract_core::ops::cast::Cast;
    use tract_onnx::tract_core::ops::cnn::{PaddingSpec, PoolSpec};
    use tract_onnx::tract_core::ops::math;

    const C: usize = 3;

    struct Pool {
        h: usize,
        w: usize,
        stride: usize,
        padding: PaddingSpec,
        /// `[1, C, H, W]` in NCHW rather than `[C, H, W]` in CHW.
        batch: bool,
        /// Read through the int8 graph's Cast, Mul, Add from i32.
        dequantize: bool,
    }

    impl Pool {
        fn dims(&self) -> TVec<usize> {
            let mut dims: TVec<usize> = tvec![C, self.h, self.w];
            if self.batch {
                dims.insert(0, 1);
            }
            dims
        }

        fn per_channel(&self, values: [f32; C]) -> TractResult<Tensor> {
            let mut shape: TVec<usize> = tvec![C, 1, 1];
            if self.batch {
                shape.insert(0, 1);
            }
            tensor1(&values).into_shape(&shape)
        }

        fn graph(&self) -> TractResult<TypedModel> {
            let mut model = TypedModel::default();
            let pool = MaxPool {
                pool_spec: PoolSpec {
                    data_format: if self.batch {
                        DataFormat::NCHW
                    } else {
                        DataFormat::CHW
                    },
                    kernel_shape: tvec![3, 3],
                    padding: self.padding.clone(),
                    dilations: None,
                    strides: Some(tvec![self.stride, self.stride]),
                    input_channels: C,
                    output_channels: C,
                },
                with_index_outputs: None,
            };
            let x = if self.dequantize {
                let x = model.add_source("x", i32::fact(self.dims()))?;
                let x = model.wire_node("cast", Cast::new(f32::datum_type()), &[x])?[0];
                let scale = model.add_const("scale.value", self.per_channel([0.5, 0.25, 2.0])?)?;
                let x = model.wire_node("rescale", math::mul(), &[x, scale])?[0];
                let shift = model.add_const("shift.value", self.per_channel([-3.0, 0.0, 7.5])?)?;
                model.wire_node("shift", math::add(), &[x, shift])?[0]
            } else {
                model.add_source("x", f32::fact(self.dims()))?
            };
            let output = model.wire_node("pool", pool, &[x])?[0];
            model.select_output_outlets(&[output])?;
            Ok(model)
        }

        fn input(&self) -> TractResult<Tensor> {
            // Distinct values in no spatial order, so that every window's
            // maximum sits somewhere else.
            let values: Vec<i32> = (0..self.dims().iter().product::<usize>())
                .map(|i| ((i * 7919) % 1009) as i32 - 500)
                .collect();
            let tensor = if self.dequantize {
                tensor1(&values)
            } else {
                tensor1(&values.iter().map(|&v| v as f32 / 8.0).collect::<Vec<_>>())
            };
            tensor.into_shape(&self.dims())
        }
    }

    fn run(model: TypedModel, input: Tensor) -> TractResult<Tensor> {
        let plan = model.into_optimized()?.into_runnable()?;
        Ok(plan
            .run(tvec!(input.into_tvalue()))?
            .remove(0)
            .into_tensor())
    }

    #[test]
    fn pools_exactly_as_tract() -> TractResult<()> {
        let paddings = [
            PaddingSpec::SameUpper,
            PaddingSpec::SameLower,
            PaddingSpec::Valid,
            PaddingSpec::ExplicitOnnxPool(tvec![1, 0], tvec![0, 1], true),
            PaddingSpec::ExplicitOnnxPool(tvec![0, 0], tvec![0, 0], true),
        ];
        // Odd and even sizes: SameUpper pads one side, two sides or none;
        // ceil mode adds a last window that runs off the input.
        for (h, w) in [(7, 6), (8, 9), (5, 5), (4, 4)] {
            for padding in &paddings {
                for stride in [1, 2] {
                    for (batch, dequantize) in [(false, false), (false, true), (true, true)] {
                        let pool = Pool {
                            h,
                            w,
                            stride,
                            padding: padding.clone(),
                            batch,
                            dequantize,
                        };
                        let case = format!("{h}x{w} {padding:?} stride {stride} batch {batch} dequantize {dequantize}");
                        let stock = pool.graph()?;
                        let mut fused = stock.clone();
                        let fusion = fuse_stages(&mut fused)?;
                        assert_eq!(
                            (fusion.max_pool, fusion.max_pool_dequantize),
                            (1, dequantize as usize),
                            "{case}"
                        );
                        let expected = run(stock, pool.input()?)?;
                        let actual = run(fused, pool.input()?)?;
                        assert_eq!(expected.shape(), actual.shape(), "{case}");
                        // A maximum picks one of its inputs: no rounding, so
                        // equality is the bar.
                        assert_eq!(values::<f32>(&expected)?, values::<f32>(&actual)?, "{case}");
                    }
                }
            }
        }
        Ok(())
    }
}
