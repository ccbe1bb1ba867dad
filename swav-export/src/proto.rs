//! The few ONNX protobuf messages an exported model needs, encoded by hand from the field numbers of
//! the ONNX specification (`onnx/onnx.proto`, proto2 syntax).
//!
//! A message is built as a tree of [`Msg`] values and written once, with every length computed
//! beforehand, so the large payloads (initialiser `raw_data`) are copied exactly once into the output.
//! Repeated scalars are written unpacked, the canonical proto2 encoding that every parser reads.
//!
//! Wire types used: 0 (varint: int32/int64/enums), 2 (length-delimited: strings, bytes, messages),
//! 5 (fixed32: float).

/// Field numbers of the messages written here (from `onnx.proto`).
pub mod field {
    // ModelProto
    /// `ModelProto.ir_version` (int64).
    pub const MODEL_IR_VERSION: u32 = 1;
    /// `ModelProto.producer_name` (string).
    pub const MODEL_PRODUCER_NAME: u32 = 2;
    /// `ModelProto.producer_version` (string).
    pub const MODEL_PRODUCER_VERSION: u32 = 3;
    /// `ModelProto.doc_string` (string).
    pub const MODEL_DOC_STRING: u32 = 6;
    /// `ModelProto.graph` (GraphProto).
    pub const MODEL_GRAPH: u32 = 7;
    /// `ModelProto.opset_import` (repeated OperatorSetIdProto).
    pub const MODEL_OPSET_IMPORT: u32 = 8;
    /// `ModelProto.metadata_props` (repeated StringStringEntryProto).
    pub const MODEL_METADATA_PROPS: u32 = 14;
    // OperatorSetIdProto
    /// `OperatorSetIdProto.domain` (string; empty for the default ONNX domain).
    pub const OPSET_DOMAIN: u32 = 1;
    /// `OperatorSetIdProto.version` (int64).
    pub const OPSET_VERSION: u32 = 2;
    // StringStringEntryProto
    /// `StringStringEntryProto.key`.
    pub const ENTRY_KEY: u32 = 1;
    /// `StringStringEntryProto.value`.
    pub const ENTRY_VALUE: u32 = 2;
    // GraphProto
    /// `GraphProto.node` (repeated NodeProto, in topological order).
    pub const GRAPH_NODE: u32 = 1;
    /// `GraphProto.name`.
    pub const GRAPH_NAME: u32 = 2;
    /// `GraphProto.initializer` (repeated TensorProto: the weights).
    pub const GRAPH_INITIALIZER: u32 = 5;
    /// `GraphProto.doc_string`.
    pub const GRAPH_DOC_STRING: u32 = 10;
    /// `GraphProto.input` (repeated ValueInfoProto).
    pub const GRAPH_INPUT: u32 = 11;
    /// `GraphProto.output` (repeated ValueInfoProto).
    pub const GRAPH_OUTPUT: u32 = 12;
    // NodeProto
    /// `NodeProto.input` (repeated string: value names).
    pub const NODE_INPUT: u32 = 1;
    /// `NodeProto.output` (repeated string: value names).
    pub const NODE_OUTPUT: u32 = 2;
    /// `NodeProto.name`.
    pub const NODE_NAME: u32 = 3;
    /// `NodeProto.op_type` (the operator, e.g. `Conv`).
    pub const NODE_OP_TYPE: u32 = 4;
    /// `NodeProto.attribute` (repeated AttributeProto).
    pub const NODE_ATTRIBUTE: u32 = 5;
    // AttributeProto
    /// `AttributeProto.name`.
    pub const ATTR_NAME: u32 = 1;
    /// `AttributeProto.f` (float).
    pub const ATTR_F: u32 = 2;
    /// `AttributeProto.i` (int64).
    pub const ATTR_I: u32 = 3;
    /// `AttributeProto.ints` (repeated int64).
    pub const ATTR_INTS: u32 = 8;
    /// `AttributeProto.type` (an [`attr_type`](super::attr_type) value).
    pub const ATTR_TYPE: u32 = 20;
    // TensorProto
    /// `TensorProto.dims` (repeated int64).
    pub const TENSOR_DIMS: u32 = 1;
    /// `TensorProto.data_type` (a [`data_type`](super::data_type) value).
    pub const TENSOR_DATA_TYPE: u32 = 2;
    /// `TensorProto.name`.
    pub const TENSOR_NAME: u32 = 8;
    /// `TensorProto.raw_data` (little-endian bytes).
    pub const TENSOR_RAW_DATA: u32 = 9;
    /// `TensorProto.external_data` (repeated StringStringEntryProto: location, offset, length).
    pub const TENSOR_EXTERNAL_DATA: u32 = 13;
    /// `TensorProto.data_location` (a [`data_location`](super::data_location) value).
    pub const TENSOR_DATA_LOCATION: u32 = 14;
    // ValueInfoProto
    /// `ValueInfoProto.name`.
    pub const VALUE_NAME: u32 = 1;
    /// `ValueInfoProto.type` (TypeProto).
    pub const VALUE_TYPE: u32 = 2;
    /// `ValueInfoProto.doc_string`.
    pub const VALUE_DOC_STRING: u32 = 3;
    // TypeProto / TypeProto.Tensor
    /// `TypeProto.tensor_type` (TypeProto.Tensor).
    pub const TYPE_TENSOR_TYPE: u32 = 1;
    /// `TypeProto.Tensor.elem_type` (a [`data_type`](super::data_type) value).
    pub const TENSOR_TYPE_ELEM_TYPE: u32 = 1;
    /// `TypeProto.Tensor.shape` (TensorShapeProto).
    pub const TENSOR_TYPE_SHAPE: u32 = 2;
    // TensorShapeProto / TensorShapeProto.Dimension
    /// `TensorShapeProto.dim` (repeated Dimension).
    pub const SHAPE_DIM: u32 = 1;
    /// `TensorShapeProto.Dimension.dim_value` (a fixed size).
    pub const DIM_VALUE: u32 = 1;
    /// `TensorShapeProto.Dimension.dim_param` (a named, symbolic size such as the batch).
    pub const DIM_PARAM: u32 = 2;
}

/// `TensorProto.DataType` values used here.
pub mod data_type {
    /// 32-bit IEEE float.
    pub const FLOAT: i64 = 1;
    /// Signed 64-bit integer (shapes, indices).
    pub const INT64: i64 = 7;
}

/// `TensorProto.DataLocation` values.
pub mod data_location {
    /// The tensor's bytes are in the file given by its `external_data` entries.
    pub const EXTERNAL: i64 = 1;
}

/// Encoded size of a length-delimited field (bytes or a message) of `len` bytes: tag, length, payload.
pub fn len_delimited(field: u32, len: usize) -> usize {
    tag_len(field) + varint_len(len as u64) + len
}

/// `AttributeProto.AttributeType` values used here.
pub mod attr_type {
    /// One float, in `f`.
    pub const FLOAT: i64 = 1;
    /// One int64, in `i`.
    pub const INT: i64 = 2;
    /// A list of int64, in `ints`.
    pub const INTS: i64 = 7;
}

#[derive(Clone, Debug)]
enum Field {
    Varint(u32, u64),
    Fixed32(u32, u32),
    Bytes(u32, Vec<u8>),
    Msg(u32, Msg),
}

/// A protobuf message under construction: its fields in the order they will be written.
#[derive(Clone, Debug, Default)]
pub struct Msg {
    fields: Vec<Field>,
}

impl Msg {
    /// A message with no fields.
    pub fn new() -> Msg {
        Msg::default()
    }

    /// An int32/int64/enum field (negative values take ten bytes, as protobuf specifies).
    pub fn int(mut self, field: u32, value: i64) -> Msg {
        self.fields.push(Field::Varint(field, value as u64));
        self
    }

    /// A repeated int64 field, unpacked.
    pub fn ints(mut self, field: u32, values: &[i64]) -> Msg {
        self.fields.extend(values.iter().map(|&v| Field::Varint(field, v as u64)));
        self
    }

    /// A float field (fixed32, little-endian bits).
    pub fn float(mut self, field: u32, value: f32) -> Msg {
        self.fields.push(Field::Fixed32(field, value.to_bits()));
        self
    }

    /// A string field (UTF-8 bytes, length-delimited).
    pub fn string(self, field: u32, value: &str) -> Msg {
        self.bytes(field, value.as_bytes().to_vec())
    }

    /// A bytes field; the payload is moved in and copied once more, on encoding.
    pub fn bytes(mut self, field: u32, value: Vec<u8>) -> Msg {
        self.fields.push(Field::Bytes(field, value));
        self
    }

    /// An embedded message field.
    pub fn msg(mut self, field: u32, value: Msg) -> Msg {
        self.fields.push(Field::Msg(field, value));
        self
    }

    /// A repeated message field, one entry per message, in order.
    pub fn msgs(mut self, field: u32, values: impl IntoIterator<Item = Msg>) -> Msg {
        self.fields.extend(values.into_iter().map(|m| Field::Msg(field, m)));
        self
    }

    /// Encoded size in bytes.
    pub fn encoded_len(&self) -> usize {
        self.fields
            .iter()
            .map(|f| match f {
                Field::Varint(n, v) => tag_len(*n) + varint_len(*v),
                Field::Fixed32(n, _) => tag_len(*n) + 4,
                Field::Bytes(n, b) => tag_len(*n) + varint_len(b.len() as u64) + b.len(),
                Field::Msg(n, m) => {
                    let len = m.encoded_len();
                    tag_len(*n) + varint_len(len as u64) + len
                }
            })
            .sum()
    }

    /// The message's wire bytes, allocated once at their final size.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut out);
        out
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        for f in &self.fields {
            match f {
                Field::Varint(n, v) => {
                    put_varint(out, tag(*n, 0));
                    put_varint(out, *v);
                }
                Field::Fixed32(n, v) => {
                    put_varint(out, tag(*n, 5));
                    out.extend_from_slice(&v.to_le_bytes());
                }
                Field::Bytes(n, b) => {
                    put_varint(out, tag(*n, 2));
                    put_varint(out, b.len() as u64);
                    out.extend_from_slice(b);
                }
                Field::Msg(n, m) => {
                    put_varint(out, tag(*n, 2));
                    put_varint(out, m.encoded_len() as u64);
                    m.encode_into(out);
                }
            }
        }
    }
}

fn tag(field: u32, wire_type: u64) -> u64 {
    (u64::from(field) << 3) | wire_type
}

fn tag_len(field: u32) -> usize {
    varint_len(tag(field, 0))
}

fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_match_the_protobuf_examples() {
        // From the protobuf encoding guide: 150 -> 96 01; field 1 varint 150 -> 08 96 01.
        assert_eq!(Msg::new().int(1, 150).encode(), [0x08, 0x96, 0x01]);
        // Negative int64: ten bytes.
        let neg = Msg::new().int(1, -1).encode();
        assert_eq!(neg.len(), 11);
        assert_eq!(&neg[1..], &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
        // String "testing" in field 2 -> 12 07 74 65 73 74 69 6e 67.
        assert_eq!(Msg::new().string(2, "testing").encode(), b"\x12\x07testing");
        // Float in field 2: tag 0x15, then little-endian bits.
        assert_eq!(Msg::new().float(2, 1.0).encode(), [0x15, 0x00, 0x00, 0x80, 0x3f]);
        for v in [0u64, 1, 127, 128, 16383, 16384, u32::MAX as u64, u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(out.len(), varint_len(v), "{v}");
        }
    }

    #[test]
    fn nested_lengths_are_exact() {
        let inner = Msg::new().int(1, 300).bytes(2, vec![7; 200]);
        let outer = Msg::new().msg(3, inner.clone()).msg(20, inner).ints(8, &[1, -2, 3]);
        let bytes = outer.encode();
        assert_eq!(bytes.len(), outer.encoded_len());
        // Field 3, wire type 2, then the inner length (2 + 3 + 2 + 200 = 206 -> ce 01 as a varint).
        assert_eq!(&bytes[..3], &[0x1a, 0xce, 0x01]);
        // Field 20 needs a two-byte tag: (20 << 3) | 2 = 162 -> a2 01.
        assert_eq!(&bytes[209..211], &[0xa2, 0x01]);
    }
}
