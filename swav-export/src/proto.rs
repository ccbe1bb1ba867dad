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
    pub const MODEL_IR_VERSION: u32 = 1;
    pub const MODEL_PRODUCER_NAME: u32 = 2;
    pub const MODEL_PRODUCER_VERSION: u32 = 3;
    pub const MODEL_DOC_STRING: u32 = 6;
    pub const MODEL_GRAPH: u32 = 7;
    pub const MODEL_OPSET_IMPORT: u32 = 8;
    pub const MODEL_METADATA_PROPS: u32 = 14;
    // OperatorSetIdProto
    pub const OPSET_DOMAIN: u32 = 1;
    pub const OPSET_VERSION: u32 = 2;
    // StringStringEntryProto
    pub const ENTRY_KEY: u32 = 1;
    pub const ENTRY_VALUE: u32 = 2;
    // GraphProto
    pub const GRAPH_NODE: u32 = 1;
    pub const GRAPH_NAME: u32 = 2;
    pub const GRAPH_INITIALIZER: u32 = 5;
    pub const GRAPH_DOC_STRING: u32 = 10;
    pub const GRAPH_INPUT: u32 = 11;
    pub const GRAPH_OUTPUT: u32 = 12;
    // NodeProto
    pub const NODE_INPUT: u32 = 1;
    pub const NODE_OUTPUT: u32 = 2;
    pub const NODE_NAME: u32 = 3;
    pub const NODE_OP_TYPE: u32 = 4;
    pub const NODE_ATTRIBUTE: u32 = 5;
    // AttributeProto
    pub const ATTR_NAME: u32 = 1;
    pub const ATTR_F: u32 = 2;
    pub const ATTR_I: u32 = 3;
    pub const ATTR_INTS: u32 = 8;
    pub const ATTR_TYPE: u32 = 20;
    // TensorProto
    pub const TENSOR_DIMS: u32 = 1;
    pub const TENSOR_DATA_TYPE: u32 = 2;
    pub const TENSOR_NAME: u32 = 8;
    pub const TENSOR_RAW_DATA: u32 = 9;
    pub const TENSOR_EXTERNAL_DATA: u32 = 13;
    pub const TENSOR_DATA_LOCATION: u32 = 14;
    // ValueInfoProto
    pub const VALUE_NAME: u32 = 1;
    pub const VALUE_TYPE: u32 = 2;
    pub const VALUE_DOC_STRING: u32 = 3;
    // TypeProto / TypeProto.Tensor
    pub const TYPE_TENSOR_TYPE: u32 = 1;
    pub const TENSOR_TYPE_ELEM_TYPE: u32 = 1;
    pub const TENSOR_TYPE_SHAPE: u32 = 2;
    // TensorShapeProto / TensorShapeProto.Dimension
    pub const SHAPE_DIM: u32 = 1;
    pub const DIM_VALUE: u32 = 1;
    pub const DIM_PARAM: u32 = 2;
}

/// `TensorProto.DataType` values used here.
pub mod data_type {
    pub const FLOAT: i64 = 1;
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
    pub const FLOAT: i64 = 1;
    pub const INT: i64 = 2;
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

    pub fn float(mut self, field: u32, value: f32) -> Msg {
        self.fields.push(Field::Fixed32(field, value.to_bits()));
        self
    }

    pub fn string(self, field: u32, value: &str) -> Msg {
        self.bytes(field, value.as_bytes().to_vec())
    }

    pub fn bytes(mut self, field: u32, value: Vec<u8>) -> Msg {
        self.fields.push(Field::Bytes(field, value));
        self
    }

    pub fn msg(mut self, field: u32, value: Msg) -> Msg {
        self.fields.push(Field::Msg(field, value));
        self
    }

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
