//! The input of a strided 1x1 convolution (Xception's residual shortcuts):
//! every `stride`-th row and column, quantized to i8 where the graph does.
//!
//! tract lowers the stride to one `Downsample` per axis, each a full copy,
//! and in the int8 graph quantizes the result in a third pass.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::quant::QuantizeLinearI8;
use tract_onnx::tract_core::ops::Downsample;

use super::{check_input, read_once, replace_with_stage, values, F32Bits, StageFusion};

/// `output[.., y, x] = input[.., row_start + y * row_stride, col_start +
/// x * col_stride]`, optionally quantized as tract's `QuantizeLinearI8`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SubsampleStage {
    input_shape: TVec<usize>,
    output_shape: TVec<usize>,
    /// `(start, stride)` along the rows and the columns.
    rows: (usize, usize),
    cols: (usize, usize),
    quantize: Option<QuantizeI8>,
}

/// `round_ties_even(x * scale) + zero_point`, clamped to i8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct QuantizeI8 {
    scale: F32Bits,
    zero_point: i8,
}

impl Op for SubsampleStage {
    fn name(&self) -> StaticName {
        "DermascopeSubsampleStage".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{:?} -> {:?}, rows {:?}, cols {:?} (start, stride){}",
            self.input_shape,
            self.output_shape,
            self.rows,
            self.cols,
            match self.quantize {
                Some(q) => format!(", quantized to i8 x {}", q.scale.get()),
                None => String::new(),
            }
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for SubsampleStage {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        check_input("subsample", &input, f32::datum_type(), &self.input_shape)?;
        let input = values::<f32>(&input)?;
        let output = match self.quantize {
            None => {
                let mut output = Tensor::zero::<f32>(&self.output_shape)?;
                self.pick(input, output.try_as_plain_ram_mut()?.as_slice_mut()?, |v| v);
                output
            }
            Some(QuantizeI8 { scale, zero_point }) => {
                let (scale, zero_point) = (scale.get(), zero_point as i32);
                let mut output = Tensor::zero::<i8>(&self.output_shape)?;
                self.pick(input, output.try_as_plain_ram_mut()?.as_slice_mut()?, |v| {
                    // tract's quantize_linear_f32_i8, step for step.
                    ((v * scale).round_ties_even() as i32 + zero_point).clamp(-128, 127) as i8
                });
                output
            }
        };
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for SubsampleStage {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1 && inputs[0].datum_type == f32::datum_type());
        let dt = match self.quantize {
            Some(_) => i8::datum_type(),
            None => f32::datum_type(),
        };
        Ok(tvec!(dt.fact(&*self.output_shape)))
    }

    as_op!();
}

impl SubsampleStage {
    fn pick<T>(&self, input: &[f32], output: &mut [T], convert: impl Fn(f32) -> T) {
        let rank = self.input_shape.len();
        let [in_h, in_w] = [self.input_shape[rank - 2], self.input_shape[rank - 1]];
        let [out_h, out_w] = [self.output_shape[rank - 2], self.output_shape[rank - 1]];
        if out_h * out_w == 0 {
            return;
        }
        let planes = input.chunks(in_h * in_w);
        for (src, dst) in planes.zip(output.chunks_mut(out_h * out_w)) {
            for (y, dst_row) in dst.chunks_mut(out_w).enumerate() {
                let row = self.rows.0 + y * self.rows.1;
                let src_row = &src[row * in_w..(row + 1) * in_w];
                for (x, d) in dst_row.iter_mut().enumerate() {
                    *d = convert(src_row[self.cols.0 + x * self.cols.1]);
                }
            }
        }
    }
}

/// A `Downsample` node's (axis, modulo, stride), if it strides forward.
fn downsample(node: &TypedNode) -> Option<(usize, usize, usize)> {
    let op = node.op_as::<Downsample>()?;
    (op.stride > 0).then_some((op.axis, op.modulo, op.stride as usize))
}

/// Replaces each pair of `Downsample`s over the last two axes of an f32
/// tensor (and the `QuantizeLinearI8` after them, where nothing else reads
/// the f32 values) by one [`SubsampleStage`].
pub(super) fn fuse(model: &mut TypedModel, fusion: &mut StageFusion) -> TractResult<()> {
    let firsts: Vec<usize> = model
        .nodes()
        .iter()
        .filter(|node| node.op_is::<Downsample>())
        .map(|node| node.id)
        .collect();
    for id in firsts {
        let Some((op, reads, replaces)) = plan_stage(model, id)? else {
            continue;
        };
        fusion.subsample += 1;
        fusion.subsample_quantize += op.quantize.is_some() as usize;
        let name = model.node(replaces.node).name.clone();
        replace_with_stage(model, name, op, reads, replaces)?;
    }
    Ok(())
}

fn plan_stage(
    model: &TypedModel,
    id: usize,
) -> TractResult<Option<(SubsampleStage, OutletId, OutletId)>> {
    let first = model.node(id);
    // Nodes an earlier stage replaced stay in the graph, unread, until the
    // model is compacted; they fail the read-once checks below.
    if downsample(first).is_none() || first.inputs.len() != 1 {
        return Ok(None);
    }
    let reads = first.inputs[0];
    let input_fact = model.outlet_fact(reads)?;
    let Some(input_shape) = input_fact.shape.as_concrete() else {
        return Ok(None);
    };
    let rank = input_shape.len();
    let first_outlet = OutletId::new(id, 0);
    if rank < 3 || input_fact.datum_type != f32::datum_type() || !read_once(model, first_outlet)? {
        return Ok(None);
    }
    let second = model.node(model.outlet_successors(first_outlet)[0].node);
    let (Some(a), Some(b)) = (downsample(first), downsample(second)) else {
        return Ok(None);
    };
    let (rows, cols) = match (a.0, b.0) {
        (r, c) if r == rank - 2 && c == rank - 1 => ((a.1, a.2), (b.1, b.2)),
        (c, r) if r == rank - 2 && c == rank - 1 => ((b.1, b.2), (a.1, a.2)),
        _ => return Ok(None),
    };
    let mut replaces = OutletId::new(second.id, 0);
    let Some(output_shape) = model.outlet_fact(replaces)?.shape.as_concrete() else {
        return Ok(None);
    };
    let output_shape: TVec<usize> = output_shape.into();
    // Every output position must read inside the input.
    let reaches = |(start, stride): (usize, usize), out: usize, len: usize| {
        out == 0 || start + (out - 1) * stride < len
    };
    if !reaches(rows, output_shape[rank - 2], input_shape[rank - 2])
        || !reaches(cols, output_shape[rank - 1], input_shape[rank - 1])
    {
        return Ok(None);
    }
    let mut quantize = None;
    if read_once(model, replaces)? {
        let next = model.node(model.outlet_successors(replaces)[0].node);
        let op = next
            .op_as::<ElementWiseOp>()
            .and_then(|op| op.0.downcast_ref::<QuantizeLinearI8>());
        let next_outlet = OutletId::new(next.id, 0);
        if let Some(op) = op {
            if model.outlet_fact(next_outlet)?.datum_type == i8::datum_type() {
                quantize = Some(QuantizeI8 {
                    scale: F32Bits::new(op.scale),
                    zero_point: op.zero_point,
                });
                replaces = next_outlet;
            }
        }
    }
    let op = SubsampleStage {
        input_shape: input_shape.into(),
        output_shape,
        rows,
        cols,
        quantize,
    };
    Ok(Some((op, reads, replaces)))
}

#[cfg(test)]
mod tests {
    use super::super::fuse_stages;
    use super::*;

    const SHAPE: [usize; 3] = [3, 7, 6];

    fn graph(quantize: bool) -> TractResult<TypedModel> {
        graph_in_order(quantize, false)
    }

    /// Rows then columns, or (`columns_first`) the other way round.
    fn graph_in_order(quantize: bool, columns_first: bool) -> TractResult<TypedModel> {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact(SHAPE))?;
        let (rows, cols) = (Downsample::new(1, 2, 0), Downsample::new(2, 2, 1));
        let x = if columns_first {
            let x = model.wire_node("cols", cols, &[x])?[0];
            model.wire_node("rows", rows, &[x])?[0]
        } else {
            let x = model.wire_node("rows", rows, &[x])?[0];
            model.wire_node("cols", cols, &[x])?[0]
        };
        let x = if quantize {
            let op = ElementWiseOp(
                // x2 puts the quarter-unit inputs on ties (x.5), where the
                // rounding mode shows, and the largest beyond i8.
                Box::new(QuantizeLinearI8 {
                    scale: 2.0,
                    zero_point: -5,
                }),
                Some(i8::datum_type()),
            );
            model.wire_node("quantize", op, &[x])?[0]
        } else {
            x
        };
        model.select_output_outlets(&[x])?;
        Ok(model)
    }

    fn input() -> Tensor {
        let values: Vec<f32> = (0..SHAPE.iter().product::<usize>())
            .map(|i| ((i * 37) % 101) as f32 * 1.25 - 60.0)
            .collect();
        tensor1(&values)
            .into_shape(&SHAPE)
            .expect("the shape's volume")
    }

    fn run(model: TypedModel) -> TractResult<TVec<Tensor>> {
        let plan = model.into_optimized()?.into_runnable()?;
        let outputs = plan.run(tvec!(input().into_tvalue()))?;
        Ok(outputs.into_iter().map(|o| o.into_tensor()).collect())
    }

    #[test]
    fn picks_and_quantizes_as_tract() -> TractResult<()> {
        for quantize in [false, true] {
            let stock = graph(quantize)?;
            let mut fused = stock.clone();
            let fusion = fuse_stages(&mut fused)?;
            assert_eq!(
                (fusion.subsample, fusion.subsample_quantize),
                (1, quantize as usize)
            );
            let (expected, actual) = (run(stock)?, run(fused)?);
            assert_eq!(expected[0].shape(), &[3, 4, 3]);
            assert_eq!(expected, actual, "quantize {quantize}");
        }
        Ok(())
    }

    #[test]
    fn takes_the_axes_in_either_order() -> TractResult<()> {
        let stock = graph_in_order(true, true)?;
        let mut fused = stock.clone();
        assert_eq!(fuse_stages(&mut fused)?.subsample_quantize, 1);
        assert_eq!(run(stock)?, run(fused)?);
        Ok(())
    }

    #[test]
    fn leaves_a_stride_whose_values_something_else_reads() -> TractResult<()> {
        for shared in ["rows", "cols"] {
            let mut stock = graph(true)?;
            let mut outputs = stock.output_outlets()?.to_vec();
            outputs.push(OutletId::new(stock.node_by_name(shared)?.id, 0));
            stock.select_output_outlets(&outputs)?;
            let mut fused = stock.clone();
            let fusion = fuse_stages(&mut fused)?;
            // Read elsewhere, the row pick stays tract's; the column pick
            // is the stage's own output, so only the quantization after it
            // stays out.
            let expected = if shared == "rows" { (0, 0) } else { (1, 0) };
            assert_eq!(
                (fusion.subsample, fusion.subsample_quantize),
                expected,
                "{shared}"
            );
            assert_eq!(run(stock)?, run(fused)?, "{shared}");
        }
        Ok(())
    }
}
