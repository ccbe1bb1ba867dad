//! An ONNX graph under construction: nodes in topological order, initialisers, and the opset-dependent
//! spelling of the few operators whose signature changed between the opsets we support.
//!
//! Values are named after the layers that produce them (`layer1.0.relu1`), initialisers after the
//! torchvision parameters they come from (`layer1.0.conv1.weight`), so a model viewer shows the same
//! names as the checkpoint.

use std::collections::BTreeSet;

use crate::proto::{attr_type, data_type, field as f, Msg};

pub(crate) struct Graph {
    pub opset: i64,
    pub nodes: Vec<Msg>,
    pub initializers: Vec<Initializer>,
    pub op_types: BTreeSet<String>,
    pub parameters: usize,
}

/// An initialiser before encoding: where its bytes go (inside the protobuf, or into an external data
/// file) is decided once the whole model's size is known.
pub(crate) struct Initializer {
    pub name: String,
    pub dims: Vec<i64>,
    pub dtype: i64,
    /// Little-endian values.
    pub raw: Vec<u8>,
}

impl Initializer {
    /// The `TensorProto` without its data.
    pub fn header(&self) -> Msg {
        Msg::new()
            .ints(f::TENSOR_DIMS, &self.dims)
            .int(f::TENSOR_DATA_TYPE, self.dtype)
            .string(f::TENSOR_NAME, &self.name)
    }
}

/// A node attribute.
pub(crate) enum Attr<'a> {
    Int(&'a str, i64),
    Ints(&'a str, &'a [i64]),
    Float(&'a str, f32),
}

impl Attr<'_> {
    fn to_msg(&self) -> Msg {
        match *self {
            Attr::Int(name, v) => {
                Msg::new().string(f::ATTR_NAME, name).int(f::ATTR_I, v).int(f::ATTR_TYPE, attr_type::INT)
            }
            Attr::Ints(name, v) => {
                Msg::new().string(f::ATTR_NAME, name).ints(f::ATTR_INTS, v).int(f::ATTR_TYPE, attr_type::INTS)
            }
            Attr::Float(name, v) => {
                Msg::new().string(f::ATTR_NAME, name).float(f::ATTR_F, v).int(f::ATTR_TYPE, attr_type::FLOAT)
            }
        }
    }
}

impl Graph {
    pub fn new(opset: i64) -> Graph {
        Graph { opset, nodes: Vec::new(), initializers: Vec::new(), op_types: BTreeSet::new(), parameters: 0 }
    }

    /// Appends a node with one output named `output` (also the node's name); returns that name.
    pub fn node(&mut self, op: &str, inputs: &[&str], output: &str, attrs: &[Attr<'_>]) -> String {
        let mut m = Msg::new();
        for i in inputs {
            m = m.string(f::NODE_INPUT, i);
        }
        m = m.string(f::NODE_OUTPUT, output).string(f::NODE_NAME, output).string(f::NODE_OP_TYPE, op);
        m = m.msgs(f::NODE_ATTRIBUTE, attrs.iter().map(Attr::to_msg));
        self.nodes.push(m);
        self.op_types.insert(op.to_string());
        output.to_string()
    }

    /// A float32 initialiser (stored as little-endian `raw_data`); returns its name.
    pub fn init_f32(&mut self, name: &str, dims: &[usize], data: &[f32]) -> String {
        debug_assert_eq!(dims.iter().product::<usize>(), data.len(), "{name}");
        let raw = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.parameters += data.len();
        self.push_tensor(name, dims, data_type::FLOAT, raw)
    }

    pub fn init_i64(&mut self, name: &str, dims: &[usize], data: &[i64]) -> String {
        let raw = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.push_tensor(name, dims, data_type::INT64, raw)
    }

    fn push_tensor(&mut self, name: &str, dims: &[usize], dtype: i64, raw: Vec<u8>) -> String {
        let dims: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
        self.initializers.push(Initializer { name: name.to_string(), dims, dtype, raw });
        name.to_string()
    }

    /// `ReduceL2` over axis 1, keeping the dimension: `axes` is an attribute before opset 18 and an
    /// int64 input from opset 18 on.
    pub fn reduce_l2_axis1(&mut self, input: &str, output: &str) -> String {
        if self.opset >= 18 {
            let axes = self.init_i64(&format!("{output}.axes"), &[1], &[1]);
            self.node("ReduceL2", &[input, &axes], output, &[Attr::Int("keepdims", 1)])
        } else {
            self.node("ReduceL2", &[input], output, &[Attr::Ints("axes", &[1]), Attr::Int("keepdims", 1)])
        }
    }
}

/// One dimension of a graph input or output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dim {
    /// A fixed size (`dim_value`).
    Fixed(usize),
    /// A symbolic dimension (`dim_param`), e.g. `batch`.
    Named(String),
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Fixed(v) => write!(f, "{v}"),
            Dim::Named(p) => f.write_str(p),
        }
    }
}

/// A float32 `ValueInfoProto` (graph input or output).
pub(crate) fn value_info(name: &str, dims: &[Dim], doc: &str) -> Msg {
    let mut shape = Msg::new();
    for d in dims {
        let dim = match d {
            Dim::Fixed(v) => Msg::new().int(f::DIM_VALUE, *v as i64),
            Dim::Named(p) => Msg::new().string(f::DIM_PARAM, p),
        };
        shape = shape.msg(f::SHAPE_DIM, dim);
    }
    let tensor = Msg::new().int(f::TENSOR_TYPE_ELEM_TYPE, data_type::FLOAT).msg(f::TENSOR_TYPE_SHAPE, shape);
    let mut m = Msg::new().string(f::VALUE_NAME, name).msg(f::VALUE_TYPE, Msg::new().msg(f::TYPE_TENSOR_TYPE, tensor));
    if !doc.is_empty() {
        m = m.string(f::VALUE_DOC_STRING, doc);
    }
    m
}
