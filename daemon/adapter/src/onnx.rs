//! Writing a trained adapter as an ONNX graph, with tract-onnx's own
//! protobuf types (so what we write is exactly what tract reads).
//!
//! Opset 18, the newest tract 0.23 is tested against: GELU is spelled out
//! with `Erf` (ONNX's own `Gelu` op needs opset 20), `LayerNormalization`
//! (opset 17) and 1-D `Conv` over a length-one sequence are native. Two
//! outputs: `logits` and `adapter_embedding` (not normalised; the daemon
//! L2-normalises it for search).

use prost::Message;
use tract_onnx::pb;

use crate::model::{AdapterWeights, LAYER_NORM_EPS, PROJECTION_WIDTH};

pub const INPUT_NAME: &str = "embedding";
pub const LOGITS_NAME: &str = "logits";
pub const EMBEDDING_NAME: &str = "adapter_embedding";
const OPSET: i64 = 18;
const IR_VERSION: i64 = 8;

fn float_tensor(
    name: &str,
    dims: &[usize],
    values: impl IntoIterator<Item = f32>,
) -> pb::TensorProto {
    let raw_data: Vec<u8> = values.into_iter().flat_map(f32::to_le_bytes).collect();
    pb::TensorProto {
        name: name.to_string(),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: pb::tensor_proto::DataType::Float as i32,
        raw_data,
        ..Default::default()
    }
}

fn int64_tensor(name: &str, values: &[i64]) -> pb::TensorProto {
    pb::TensorProto {
        name: name.to_string(),
        dims: vec![values.len() as i64],
        data_type: pb::tensor_proto::DataType::Int64 as i32,
        raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

fn node(
    op: &str,
    inputs: &[&str],
    output: &str,
    attributes: Vec<pb::AttributeProto>,
) -> pb::NodeProto {
    pb::NodeProto {
        op_type: op.to_string(),
        name: output.to_string(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.to_string()],
        attribute: attributes,
        ..Default::default()
    }
}

fn int_attribute(name: &str, value: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.to_string(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i: value,
        ..Default::default()
    }
}

fn ints_attribute(name: &str, values: &[i64]) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.to_string(),
        r#type: pb::attribute_proto::AttributeType::Ints as i32,
        ints: values.to_vec(),
        ..Default::default()
    }
}

fn float_attribute(name: &str, value: f32) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.to_string(),
        r#type: pb::attribute_proto::AttributeType::Float as i32,
        f: value,
        ..Default::default()
    }
}

/// Exact GELU, x · ½ · (1 + erf(x / √2)), as the training side computes it.
fn gelu(input: &str, output: &str) -> [pb::NodeProto; 5] {
    let name = |step: &str| format!("{output}_{step}");
    [
        node("Div", &[input, "sqrt_2"], &name("scaled"), vec![]),
        node("Erf", &[&name("scaled")], &name("erf"), vec![]),
        node("Add", &[&name("erf"), "one"], &name("shifted"), vec![]),
        node("Mul", &[input, &name("shifted")], &name("product"), vec![]),
        node("Mul", &[&name("product"), "half"], output, vec![]),
    ]
}

fn value_info(name: &str, dims: &[Option<usize>]) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{dimension::Value, Dimension};
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Some(n) => Value::DimValue(*n as i64),
                None => Value::DimParam("batch".to_string()),
            }),
            ..Default::default()
        })
        .collect();
    pb::ValueInfoProto {
        name: name.to_string(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: pb::tensor_proto::DataType::Float as i32,
                shape: Some(pb::TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A Conv1d kernel of width 3 whose centre tap is `centre` (`out × in`) and
/// whose side taps are zero (see the `model` module on why).
fn conv_kernel(name: &str, centre: &ndarray::Array2<f32>) -> pb::TensorProto {
    let (out, input) = centre.dim();
    let values = centre.iter().flat_map(|&w| [0.0, w, 0.0]);
    float_tensor(name, &[out, input, 3], values)
}

/// The adapter as ONNX bytes. `doc` lands in the model's doc string.
pub fn export(weights: &AdapterWeights, doc: &str) -> Vec<u8> {
    let shape = weights.shape;
    let p = PROJECTION_WIDTH;
    let h = shape.hidden;
    let initializer = vec![
        float_tensor("input_scale", &[], [weights.input_scale]),
        float_tensor("w1", &[p, shape.input_dim], weights.w1.iter().copied()),
        float_tensor("b1", &[p], weights.b1.iter().copied()),
        float_tensor("w2", &[p, p], weights.w2.iter().copied()),
        float_tensor("b2", &[p], weights.b2.iter().copied()),
        float_tensor("norm_gain", &[p], weights.norm_gain.iter().copied()),
        float_tensor("norm_bias", &[p], weights.norm_bias.iter().copied()),
        conv_kernel("conv1", &weights.conv1),
        float_tensor("conv1_bias", &[h], weights.conv1_bias.iter().copied()),
        conv_kernel("conv2", &weights.conv2),
        float_tensor("conv2_bias", &[h], weights.conv2_bias.iter().copied()),
        float_tensor("head", &[shape.classes, h], weights.head.iter().copied()),
        float_tensor(
            "head_bias",
            &[shape.classes],
            weights.head_bias.iter().copied(),
        ),
        int64_tensor("sequence_axis", &[2]),
        float_tensor("sqrt_2", &[], [std::f32::consts::SQRT_2]),
        float_tensor("half", &[], [0.5]),
        float_tensor("one", &[], [1.0]),
    ];
    let conv = || {
        vec![
            ints_attribute("kernel_shape", &[3]),
            ints_attribute("pads", &[1, 1]),
        ]
    };
    let gemm = || vec![int_attribute("transB", 1)];
    let mut nodes = vec![
        node("Mul", &[INPUT_NAME, "input_scale"], "scaled", vec![]),
        node("Gemm", &["scaled", "w1", "b1"], "z1", gemm()),
    ];
    nodes.extend(gelu("z1", "a1"));
    nodes.extend([
        node("Gemm", &["a1", "w2", "b2"], "z2", gemm()),
        node(
            "LayerNormalization",
            &["z2", "norm_gain", "norm_bias"],
            "normed",
            vec![
                int_attribute("axis", -1),
                float_attribute("epsilon", LAYER_NORM_EPS),
            ],
        ),
        node(
            "Unsqueeze",
            &["normed", "sequence_axis"],
            "sequence",
            vec![],
        ),
        node("Conv", &["sequence", "conv1", "conv1_bias"], "c1", conv()),
    ]);
    nodes.extend(gelu("c1", "a3"));
    nodes.extend([
        node("Conv", &["a3", "conv2", "conv2_bias"], "c2", conv()),
        node("Squeeze", &["c2", "sequence_axis"], EMBEDDING_NAME, vec![]),
        node(
            "Gemm",
            &[EMBEDDING_NAME, "head", "head_bias"],
            LOGITS_NAME,
            gemm(),
        ),
    ]);
    let graph = pb::GraphProto {
        name: "dermascope_adapter".to_string(),
        node: nodes,
        initializer,
        input: vec![value_info(INPUT_NAME, &[None, Some(shape.input_dim)])],
        output: vec![
            value_info(LOGITS_NAME, &[None, Some(shape.classes)]),
            value_info(EMBEDDING_NAME, &[None, Some(h)]),
        ],
        ..Default::default()
    };
    let model = pb::ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        producer_name: "dermascope-adapter".to_string(),
        producer_version: env!("CARGO_PKG_VERSION").to_string(),
        doc_string: doc.to_string(),
        graph: Some(graph),
        ..Default::default()
    };
    model.encode_to_vec()
}
