//! The legacy stream of `torch.save` before PyTorch 1.6 (and with `_use_new_zipfile_serialization=False`
//! since): the format of the official SwAV checkpoints of 2020. Five pickles, then the storages:
//!
//! 1. the magic number `0x1950a86a20f9469cfc6c`;
//! 2. the protocol version `1001`;
//! 3. `sys_info`, a dict (`protocol_version`, `little_endian`, `type_sizes`);
//! 4. the object itself, whose storages are persistent ids `('storage', torch.XStorage, key, location,
//!    numel, None)`;
//! 5. the list of storage keys, in the order their data follows;
//!
//! then, for each key, an 8-byte little-endian element count and that many elements, little-endian
//! (PyTorch converts on big-endian hosts). The element size of each storage comes from its persistent id.

use std::collections::HashMap;

use super::pickle::{kind, unpickle, Node, Pickle};
use super::tensor::DType;
use super::zip::take_elements;
use super::TorchError;

/// `torch.serialization.MAGIC_NUMBER`, as the little-endian bytes of the pickled int.
const MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
/// `torch.serialization.PROTOCOL_VERSION`.
const PROTOCOL_VERSION: i64 = 1001;

/// A legacy file: the main pickle and each storage's bytes.
#[derive(Debug)]
pub(crate) struct Legacy<'a> {
    /// The object saved (pickle 4).
    pub pickle: Pickle,
    /// Storage key -> (element type, all of its bytes).
    storages: HashMap<String, (DType, &'a [u8])>,
}

impl<'a> Legacy<'a> {
    /// Parses the whole stream.
    pub(crate) fn read(bytes: &'a [u8]) -> Result<Legacy<'a>, TorchError> {
        let mut reader = Reader { bytes, pos: 0 };
        let magic = reader.pickle()?;
        if !matches!(magic.node(magic.root()), Node::BigInt(b) if **b == MAGIC) {
            return Err(legacy("the first pickle is not PyTorch's magic number: not a PyTorch file".into()));
        }
        let version = reader.pickle()?;
        match version.node(version.root()) {
            Node::Int(PROTOCOL_VERSION) => {}
            other => return Err(legacy(format!("protocol version is {other:?}, expected {PROTOCOL_VERSION}"))),
        }
        let sys_info = reader.pickle()?;
        if sys_info.dict(sys_info.root()).is_none() {
            return Err(legacy("the third pickle (sys_info) is not a dict".into()));
        }
        let pickle = reader.pickle()?;
        let keys = reader.pickle()?;
        let dtypes = storage_types(&pickle)?;
        let storages = reader.storages(&keys, &dtypes)?;
        Ok(Legacy { pickle, storages })
    }

    /// Exactly the bytes of `numel` elements of storage `key`.
    pub(crate) fn storage(&self, key: &str, dtype: DType, numel: u64) -> Result<&'a [u8], TorchError> {
        let Some(&(_, bytes)) = self.storages.get(key) else {
            return Err(TorchError::Storage { key: key.to_string(), detail: "not among the stored storages".into() });
        };
        take_elements(key, bytes, dtype, numel)
    }
}

fn legacy(detail: String) -> TorchError {
    TorchError::Legacy(detail)
}

/// The element type of every storage key the main pickle uses.
fn storage_types(pickle: &Pickle) -> Result<HashMap<&str, DType>, TorchError> {
    let mut types = HashMap::new();
    for s in pickle.storages() {
        let key = pickle.str(s.key).unwrap_or_default();
        if let Some(previous) = types.insert(key, s.dtype) {
            if previous != s.dtype {
                return Err(TorchError::Storage {
                    key: key.to_string(),
                    detail: "used with two different element types".into(),
                });
            }
        }
    }
    Ok(types)
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn pickle(&mut self) -> Result<Pickle, TorchError> {
        let (pickle, used) = unpickle(&self.bytes[self.pos..]).map_err(|e| self.at(e))?;
        self.pos += used;
        Ok(pickle)
    }

    /// Errors inside a pickle carry offsets relative to it; say where in the file it started.
    fn at(&self, e: TorchError) -> TorchError {
        match e {
            TorchError::Malformed { pos, detail } => TorchError::Malformed { pos: pos + self.pos, detail },
            TorchError::Truncated { what, pos, need, have } => {
                TorchError::Truncated { what, pos: pos + self.pos, need, have }
            }
            TorchError::Opcode { opcode, printable, pos } => {
                TorchError::Opcode { opcode, printable, pos: pos + self.pos }
            }
            other => other,
        }
    }

    /// Reads the storages after the key list, each checked against the bytes that remain before slicing.
    fn storages(
        &mut self,
        keys: &Pickle,
        dtypes: &HashMap<&str, DType>,
    ) -> Result<HashMap<String, (DType, &'a [u8])>, TorchError> {
        let list = match keys.node(keys.root()) {
            Node::List(items) => items,
            other => return Err(legacy(format!("the storage key list is a {}", kind(other)))),
        };
        let mut storages = HashMap::with_capacity(list.len().min(dtypes.len()));
        for &item in list {
            let key = keys.str(item).ok_or_else(|| legacy("a storage key is not a string".into()))?;
            let &dtype = dtypes.get(key).ok_or_else(|| TorchError::Storage {
                key: key.to_string(),
                detail: "listed in the file but named by no persistent id of the pickle".into(),
            })?;
            let bytes = self.storage(key, dtype)?;
            if storages.insert(key.to_string(), (dtype, bytes)).is_some() {
                return Err(TorchError::Storage { key: key.to_string(), detail: "listed twice".into() });
            }
        }
        Ok(storages)
    }

    fn storage(&mut self, key: &str, dtype: DType) -> Result<&'a [u8], TorchError> {
        let rest = &self.bytes[self.pos..];
        let err = |detail: String| TorchError::Storage { key: key.to_string(), detail };
        let Some((count, data)) = rest.split_first_chunk::<8>() else {
            return Err(err(format!("the file ends at byte {} before its element count", self.bytes.len())));
        };
        let count = u64::from_le_bytes(*count);
        let len = count.checked_mul(dtype.size() as u64).filter(|&n| n <= data.len() as u64).ok_or_else(|| {
            err(format!(
                "claims {count} {} elements ({} bytes each) but only {} bytes remain in the file",
                dtype.storage_name(),
                dtype.size(),
                data.len()
            ))
        })?;
        self.pos += 8 + len as usize;
        Ok(&data[..len as usize])
    }
}
