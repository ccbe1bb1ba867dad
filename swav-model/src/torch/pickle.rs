//! A restricted pickle machine: it runs the opcodes that `torch.save` writes for a state dict and
//! nothing else, and it executes no code.
//!
//! A pickle is a program for a stack machine; `REDUCE` calls any importable function with arguments the
//! file chooses (`os.system("...")` is three opcodes). This machine knows a short allow-list of globals
//! ([`resolve_global`]) and refuses every other one by name, at the `GLOBAL` opcode, before anything
//! uses it. "Calling" an allowed global builds a description, never runs Python: `OrderedDict()` makes
//! an empty dict node, `_rebuild_tensor_v2(storage, offset, size, stride, ...)` a tensor node that only
//! records its arguments, `_rebuild_parameter(tensor, ...)` returns its tensor. A persistent id
//! (`BINPERSID`, how PyTorch refers to storages outside the pickle) becomes a storage node.
//!
//! Memory: objects live in an arena ([`Pickle::nodes`]) and the stack, the memo and containers hold
//! indices into it. Every opcode consumes at least one byte and adds at most one node, one stack slot
//! or one memo entry, so all of them are bounded by the input's length; a memo `GET` copies an index,
//! never an object (no exponential "billion laughs" growth); strings and byte strings are allocated only
//! after their length has been checked against the remaining input. The arena also means no recursive
//! drop and no recursion anywhere, so cyclic or deeply nested inputs cannot overflow the stack; nesting
//! is still capped at [`MAX_DEPTH`] levels because no state dict comes close.

use std::collections::HashMap;

use super::tensor::DType;
use super::TorchError;

/// Index of a node in a [`Pickle`]'s arena.
pub(crate) type NodeId = u32;

/// Deepest nesting of containers accepted (a training checkpoint's optimizer state is 6 levels deep).
pub(crate) const MAX_DEPTH: u8 = 64;

/// Most dimensions a tensor may have (PyTorch's own limit is 64 too).
pub(crate) const MAX_RANK: usize = 64;

/// The globals a state dict may name, for error messages.
const ALLOWED: &str = "collections.OrderedDict, torch._utils._rebuild_tensor_v2, torch._utils._rebuild_parameter, \
torch.{Float,Half,BFloat16,Double,Long,Int,Short,Char,Byte,Bool}Storage";

/// One object built by the pickle.
#[derive(Debug)]
pub(crate) enum Node {
    None,
    Bool(bool),
    Int(i64),
    /// An integer wider than 64 bits, little-endian two's complement (the legacy magic number).
    BigInt(Box<[u8]>),
    Float(f64),
    Str(Box<str>),
    /// A byte string; its content is never needed, so it is skipped.
    Bytes,
    Tuple(Vec<NodeId>),
    List(Vec<NodeId>),
    /// A dict or `OrderedDict`: its items in insertion order (a repeated key keeps both; readers take the last).
    Dict(Vec<(NodeId, NodeId)>),
    Global(Global),
    Storage(Storage),
    Tensor(TensorRef),
}

/// The allowed globals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    StorageType(DType),
}

/// A storage named by a persistent id `('storage', torch.XStorage, key, location, numel[, None])`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Storage {
    /// A [`Node::Str`]: the storage's key (its file name in a zip archive).
    pub key: NodeId,
    pub dtype: DType,
    /// Elements the pickle says the storage holds; the reader checks it against the real bytes.
    pub numel: u64,
}

/// `_rebuild_tensor_v2(storage, offset, size, stride, ...)`, arguments checked for type and sign.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TensorRef {
    /// A [`Node::Storage`].
    pub storage: NodeId,
    pub offset: u64,
    /// A [`Node::Tuple`] of non-negative [`Node::Int`]s, at most [`MAX_RANK`] of them.
    pub size: NodeId,
    /// Like `size`, of the same length.
    pub stride: NodeId,
}

/// The result of running one pickle: the arena and the object `STOP` returned.
#[derive(Debug)]
pub(crate) struct Pickle {
    nodes: Vec<Node>,
    root: NodeId,
}

static NONE: Node = Node::None;

impl Pickle {
    /// The object the pickle returned.
    pub(crate) fn root(&self) -> NodeId {
        self.root
    }

    /// A node by id. Ids come from this arena, so the fallback is never taken; it keeps the
    /// accessor total without a panic path.
    pub(crate) fn node(&self, id: NodeId) -> &Node {
        self.nodes.get(id as usize).unwrap_or(&NONE)
    }

    /// The string a node holds, if it is one.
    pub(crate) fn str(&self, id: NodeId) -> Option<&str> {
        match self.node(id) {
            Node::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The items of a dict node.
    pub(crate) fn dict(&self, id: NodeId) -> Option<&[(NodeId, NodeId)]> {
        match self.node(id) {
            Node::Dict(items) => Some(items),
            _ => None,
        }
    }

    /// A tuple of non-negative ints (a tensor's size or stride, checked when the tensor was built).
    pub(crate) fn uints(&self, id: NodeId) -> Vec<u64> {
        match self.node(id) {
            Node::Tuple(items) => {
                items.iter().map(|&i| if let Node::Int(v) = self.node(i) { *v as u64 } else { 0 }).collect()
            }
            _ => Vec::new(),
        }
    }

    /// Every storage node, in arena order.
    pub(crate) fn storages(&self) -> impl Iterator<Item = &Storage> {
        self.nodes.iter().filter_map(|n| if let Node::Storage(s) = n { Some(s) } else { None })
    }
}

/// A short name of a node's kind, for messages.
pub(crate) fn kind(node: &Node) -> &'static str {
    match node {
        Node::None => "None",
        Node::Bool(_) => "bool",
        Node::Int(_) | Node::BigInt(_) => "int",
        Node::Float(_) => "float",
        Node::Str(_) => "str",
        Node::Bytes => "bytes",
        Node::Tuple(_) => "tuple",
        Node::List(_) => "list",
        Node::Dict(_) => "dict",
        Node::Global(_) => "global",
        Node::Storage(_) => "storage",
        Node::Tensor(_) => "tensor",
    }
}

/// Runs the pickle at the start of `input`; returns it and the number of bytes up to and including
/// its `STOP` (the legacy format concatenates several pickles).
pub(crate) fn unpickle(input: &[u8]) -> Result<(Pickle, usize), TorchError> {
    let mut m = Machine {
        input,
        pos: 0,
        op_pos: 0,
        nodes: Vec::new(),
        depth: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    };
    // Shared immutable singletons, so that a run of one-byte `None`/`True`/`()` opcodes grows only the stack.
    for node in [Node::None, Node::Bool(true), Node::Bool(false), Node::Tuple(Vec::new())] {
        m.alloc(node, 1)?;
    }
    let root = m.run()?;
    Ok((Pickle { nodes: m.nodes, root }, m.pos))
}

/// Whether `b` is an opcode this machine runs (for sniffing a file's type).
pub(crate) fn is_supported_opcode(b: u8) -> bool {
    op::ALL.contains(&b)
}

/// The opcodes run here (names as in CPython's `pickletools`); all others are refused.
mod op {
    pub const MARK: u8 = b'(';
    pub const STOP: u8 = b'.';
    pub const POP: u8 = b'0';
    pub const POP_MARK: u8 = b'1';
    pub const DUP: u8 = b'2';
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const BININT2: u8 = b'M';
    pub const NONE: u8 = b'N';
    pub const BINPERSID: u8 = b'Q';
    pub const REDUCE: u8 = b'R';
    pub const BINUNICODE: u8 = b'X';
    pub const BINBYTES: u8 = b'B';
    pub const SHORT_BINBYTES: u8 = b'C';
    pub const EMPTY_LIST: u8 = b']';
    pub const APPEND: u8 = b'a';
    pub const BUILD: u8 = b'b';
    pub const GLOBAL: u8 = b'c';
    pub const DICT: u8 = b'd';
    pub const EMPTY_DICT: u8 = b'}';
    pub const APPENDS: u8 = b'e';
    pub const BINGET: u8 = b'h';
    pub const LONG_BINGET: u8 = b'j';
    pub const LIST: u8 = b'l';
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const SETITEM: u8 = b's';
    pub const TUPLE: u8 = b't';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const SETITEMS: u8 = b'u';
    pub const BINFLOAT: u8 = b'G';
    pub const PROTO: u8 = 0x80;
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const LONG1: u8 = 0x8a;
    pub const LONG4: u8 = 0x8b;
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BINUNICODE8: u8 = 0x8d;
    pub const BINBYTES8: u8 = 0x8e;
    pub const STACK_GLOBAL: u8 = 0x93;
    pub const MEMOIZE: u8 = 0x94;
    pub const FRAME: u8 = 0x95;
    /// Every opcode above.
    pub const ALL: [u8; 45] = [
        MARK,
        STOP,
        POP,
        POP_MARK,
        DUP,
        BININT,
        BININT1,
        BININT2,
        NONE,
        BINPERSID,
        REDUCE,
        BINUNICODE,
        BINBYTES,
        SHORT_BINBYTES,
        EMPTY_LIST,
        APPEND,
        BUILD,
        GLOBAL,
        DICT,
        EMPTY_DICT,
        APPENDS,
        BINGET,
        LONG_BINGET,
        LIST,
        BINPUT,
        LONG_BINPUT,
        SETITEM,
        TUPLE,
        EMPTY_TUPLE,
        SETITEMS,
        BINFLOAT,
        PROTO,
        TUPLE1,
        TUPLE2,
        TUPLE3,
        NEWTRUE,
        NEWFALSE,
        LONG1,
        LONG4,
        SHORT_BINUNICODE,
        BINUNICODE8,
        BINBYTES8,
        STACK_GLOBAL,
        MEMOIZE,
        FRAME,
    ];
}

const NONE_ID: NodeId = 0;
const TRUE_ID: NodeId = 1;
const FALSE_ID: NodeId = 2;
const EMPTY_TUPLE_ID: NodeId = 3;

struct Machine<'a> {
    input: &'a [u8],
    /// Next byte to read.
    pos: usize,
    /// Offset of the opcode being run, for messages.
    op_pos: usize,
    nodes: Vec<Node>,
    /// Nesting depth of each node (1 for leaves), parallel to `nodes`.
    depth: Vec<u8>,
    stack: Vec<NodeId>,
    /// Stack lengths at each `MARK` (CPython's metastack).
    marks: Vec<usize>,
    memo: HashMap<u32, NodeId>,
}

impl<'a> Machine<'a> {
    fn run(&mut self) -> Result<NodeId, TorchError> {
        loop {
            self.op_pos = self.pos;
            let opcode = self.byte("opcode")?;
            if opcode == op::STOP {
                return self.pop();
            }
            self.step(opcode)?;
        }
    }

    fn step(&mut self, opcode: u8) -> Result<(), TorchError> {
        match opcode {
            op::PROTO => {
                let version = self.byte("protocol version")?;
                if version > 5 {
                    return Err(self.malformed(format!("unknown pickle protocol {version}")));
                }
            }
            // Framing (protocol 4) only groups opcodes for buffered reads.
            op::FRAME => _ = self.take(8, "frame length")?,
            op::MARK => self.marks.push(self.stack.len()),
            op::POP => self.pop_or_mark()?,
            op::POP_MARK => _ = self.pop_mark()?,
            op::DUP => {
                let top = self.top()?;
                self.stack.push(top);
            }
            op::NONE => self.stack.push(NONE_ID),
            op::NEWTRUE => self.stack.push(TRUE_ID),
            op::NEWFALSE => self.stack.push(FALSE_ID),
            op::EMPTY_TUPLE => self.stack.push(EMPTY_TUPLE_ID),
            op::BININT => {
                let v = i32::from_le_bytes(self.array("BININT")?);
                self.push(Node::Int(v.into()))?;
            }
            op::BININT1 => {
                let v = self.byte("BININT1")?;
                self.push(Node::Int(v.into()))?;
            }
            op::BININT2 => {
                let v = u16::from_le_bytes(self.array("BININT2")?);
                self.push(Node::Int(v.into()))?;
            }
            op::LONG1 => {
                let n = self.byte("LONG1 length")?;
                self.long(n.into())?;
            }
            op::LONG4 => {
                let n = i32::from_le_bytes(self.array("LONG4 length")?);
                let n = u64::try_from(n).map_err(|_| self.malformed("negative LONG4 length"))?;
                self.long(n)?;
            }
            op::BINFLOAT => {
                let v = f64::from_be_bytes(self.array("BINFLOAT")?);
                self.push(Node::Float(v))?;
            }
            op::SHORT_BINUNICODE => {
                let n = self.byte("string length")?;
                self.unicode(n.into())?;
            }
            op::BINUNICODE => {
                let n = u32::from_le_bytes(self.array("string length")?);
                self.unicode(n.into())?;
            }
            op::BINUNICODE8 => {
                let n = u64::from_le_bytes(self.array("string length")?);
                self.unicode(n)?;
            }
            op::SHORT_BINBYTES => {
                let n = self.byte("bytes length")?;
                self.bytes(n.into())?;
            }
            op::BINBYTES => {
                let n = u32::from_le_bytes(self.array("bytes length")?);
                self.bytes(n.into())?;
            }
            op::BINBYTES8 => {
                let n = u64::from_le_bytes(self.array("bytes length")?);
                self.bytes(n)?;
            }
            op::TUPLE => {
                let items = self.pop_mark()?;
                self.container(Node::Tuple, items)?;
            }
            op::TUPLE1 | op::TUPLE2 | op::TUPLE3 => {
                let n = usize::from(opcode - op::TUPLE1 + 1);
                let items = self.pop_n(n)?;
                self.container(Node::Tuple, items)?;
            }
            op::EMPTY_LIST => _ = self.push(Node::List(Vec::new()))?,
            op::LIST => {
                let items = self.pop_mark()?;
                self.container(Node::List, items)?;
            }
            op::APPEND => {
                let item = self.pop()?;
                self.extend_list(vec![item])?;
            }
            op::APPENDS => {
                let items = self.pop_mark()?;
                self.extend_list(items)?;
            }
            op::EMPTY_DICT => _ = self.push(Node::Dict(Vec::new()))?,
            op::DICT => {
                let items = self.pop_mark()?;
                let pairs = self.pairs(items)?;
                let id = self.push(Node::Dict(Vec::new()))?;
                self.extend_dict(id, pairs)?;
            }
            op::SETITEM => {
                let items = self.pop_n(2)?;
                let pairs = self.pairs(items)?;
                let id = self.top()?;
                self.extend_dict(id, pairs)?;
            }
            op::SETITEMS => {
                let items = self.pop_mark()?;
                let pairs = self.pairs(items)?;
                let id = self.top()?;
                self.extend_dict(id, pairs)?;
            }
            op::GLOBAL => {
                let module = self.line("GLOBAL module")?;
                let name = self.line("GLOBAL name")?;
                let global = resolve_global(module, name)?;
                self.push(Node::Global(global))?;
            }
            op::STACK_GLOBAL => {
                let name = self.pop()?;
                let module = self.pop()?;
                let global = match (self.get(module), self.get(name)) {
                    (Node::Str(m), Node::Str(n)) => resolve_global(m, n)?,
                    _ => return Err(self.malformed("STACK_GLOBAL needs two strings")),
                };
                self.push(Node::Global(global))?;
            }
            op::REDUCE => {
                let args = self.pop()?;
                let callable = self.pop()?;
                let result = self.reduce(callable, args)?;
                self.stack.push(result);
            }
            op::BUILD => self.build()?,
            op::BINPERSID => {
                let pid = self.pop()?;
                let storage = self.persistent_load(pid)?;
                self.push(Node::Storage(storage))?;
            }
            op::BINPUT => {
                let id = self.byte("memo id")?;
                self.memo_put(id.into())?;
            }
            op::LONG_BINPUT => {
                let id = u32::from_le_bytes(self.array("memo id")?);
                self.memo_put(id)?;
            }
            op::MEMOIZE => {
                let id = u32::try_from(self.memo.len()).map_err(|_| TorchError::Limit("memo too large".into()))?;
                self.memo_put(id)?;
            }
            op::BINGET => {
                let id = self.byte("memo id")?;
                self.memo_get(id.into())?;
            }
            op::LONG_BINGET => {
                let id = u32::from_le_bytes(self.array("memo id")?);
                self.memo_get(id)?;
            }
            _ => {
                let printable = if opcode.is_ascii_graphic() { opcode as char } else { '?' };
                return Err(TorchError::Opcode { opcode, printable, pos: self.op_pos });
            }
        }
        Ok(())
    }

    // ---- reading the input ----

    fn take(&mut self, n: u64, what: &'static str) -> Result<&'a [u8], TorchError> {
        let input = self.input;
        let have = input.len() - self.pos;
        match usize::try_from(n) {
            Ok(n) if n <= have => {
                let bytes = &input[self.pos..self.pos + n];
                self.pos += n;
                Ok(bytes)
            }
            _ => Err(TorchError::Truncated { what, pos: self.op_pos, need: n, have }),
        }
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], TorchError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N as u64, what)?);
        Ok(a)
    }

    fn byte(&mut self, what: &'static str) -> Result<u8, TorchError> {
        Ok(self.array::<1>(what)?[0])
    }

    /// A `\n`-terminated UTF-8 line (the text arguments of `GLOBAL`).
    fn line(&mut self, what: &'static str) -> Result<&'a str, TorchError> {
        let input = self.input;
        let rest = &input[self.pos..];
        let Some(n) = rest.iter().position(|&b| b == b'\n') else {
            return Err(TorchError::Truncated {
                what,
                pos: self.op_pos,
                need: rest.len() as u64 + 1,
                have: rest.len(),
            });
        };
        self.pos += n + 1;
        std::str::from_utf8(&rest[..n]).map_err(|_| self.malformed(format!("{what} is not UTF-8")))
    }

    fn long(&mut self, n: u64) -> Result<(), TorchError> {
        let bytes = self.take(n, "LONG bytes")?;
        // Little-endian two's complement; it fits an i64 when the bytes past the eighth only repeat
        // the sign (encoders are not obliged to write the shortest form).
        let negative = bytes.last().is_some_and(|b| b & 0x80 != 0);
        let fill = if negative { 0xff } else { 0 };
        let (low, high) = bytes.split_at(bytes.len().min(8));
        let fits = high.is_empty() || (high.iter().all(|&b| b == fill) && (low[7] & 0x80 != 0) == negative);
        let node = if fits {
            let mut a = [fill; 8];
            a[..low.len()].copy_from_slice(low);
            Node::Int(i64::from_le_bytes(a))
        } else {
            Node::BigInt(bytes.into())
        };
        self.push(node)?;
        Ok(())
    }

    fn unicode(&mut self, n: u64) -> Result<(), TorchError> {
        let pos = self.op_pos;
        let bytes = self.take(n, "string")?;
        let s = std::str::from_utf8(bytes).map_err(|_| TorchError::malformed(pos, "string is not UTF-8"))?;
        let node = Node::Str(s.into());
        self.push(node)?;
        Ok(())
    }

    fn bytes(&mut self, n: u64) -> Result<(), TorchError> {
        self.take(n, "bytes")?;
        self.push(Node::Bytes)?;
        Ok(())
    }

    fn malformed(&self, detail: impl Into<String>) -> TorchError {
        TorchError::malformed(self.op_pos, detail)
    }

    /// A node by id (ids come from this arena; the fallback keeps indexing panic-free).
    fn get(&self, id: NodeId) -> &Node {
        self.nodes.get(id as usize).unwrap_or(&NONE)
    }

    // ---- the arena and the stack ----

    fn alloc(&mut self, node: Node, depth: u8) -> Result<NodeId, TorchError> {
        if depth > MAX_DEPTH {
            return Err(TorchError::Limit(format!(
                "objects nested deeper than {MAX_DEPTH} levels at byte {}",
                self.op_pos
            )));
        }
        let id = NodeId::try_from(self.nodes.len())
            .map_err(|_| TorchError::Limit("more than 2^32 pickle objects".into()))?;
        self.nodes.push(node);
        self.depth.push(depth);
        Ok(id)
    }

    /// Allocates a leaf and pushes it.
    fn push(&mut self, node: Node) -> Result<NodeId, TorchError> {
        let id = self.alloc(node, 1)?;
        self.stack.push(id);
        Ok(id)
    }

    /// The stack above the innermost mark is all that opcodes may pop (as in CPython).
    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> Result<NodeId, TorchError> {
        if self.stack.len() <= self.floor() {
            return Err(self.malformed("pop from an empty stack"));
        }
        self.stack.pop().ok_or_else(|| self.malformed("pop from an empty stack"))
    }

    fn top(&self) -> Result<NodeId, TorchError> {
        if self.stack.len() <= self.floor() {
            return Err(self.malformed("empty stack"));
        }
        self.stack.last().copied().ok_or_else(|| self.malformed("empty stack"))
    }

    fn pop_n(&mut self, n: usize) -> Result<Vec<NodeId>, TorchError> {
        if self.stack.len() < self.floor() + n {
            return Err(self.malformed(format!("needs {n} stack items")));
        }
        Ok(self.stack.split_off(self.stack.len() - n))
    }

    fn pop_mark(&mut self) -> Result<Vec<NodeId>, TorchError> {
        let mark = self.marks.pop().ok_or_else(|| self.malformed("no MARK on the stack"))?;
        if mark > self.stack.len() {
            return Err(self.malformed("MARK above the stack"));
        }
        Ok(self.stack.split_off(mark))
    }

    fn pop_or_mark(&mut self) -> Result<(), TorchError> {
        if self.stack.len() > self.floor() {
            self.pop()?;
        } else {
            self.pop_mark()?;
        }
        Ok(())
    }

    fn depth_of(&self, items: &[NodeId]) -> u8 {
        items.iter().map(|&i| self.depth.get(i as usize).copied().unwrap_or(1)).max().unwrap_or(0).saturating_add(1)
    }

    /// A new tuple or list of `items`, pushed.
    fn container(&mut self, make: fn(Vec<NodeId>) -> Node, items: Vec<NodeId>) -> Result<(), TorchError> {
        let depth = self.depth_of(&items);
        let id = self.alloc(make(items), depth)?;
        self.stack.push(id);
        Ok(())
    }

    /// Records that `container` now holds children as deep as `items`.
    fn deepen(&mut self, container: NodeId, items: &[NodeId]) -> Result<(), TorchError> {
        let depth = self.depth_of(items);
        if depth > MAX_DEPTH {
            return Err(TorchError::Limit(format!(
                "objects nested deeper than {MAX_DEPTH} levels at byte {}",
                self.op_pos
            )));
        }
        if let Some(d) = self.depth.get_mut(container as usize) {
            *d = (*d).max(depth);
        }
        Ok(())
    }

    fn extend_list(&mut self, items: Vec<NodeId>) -> Result<(), TorchError> {
        let id = self.top()?;
        self.deepen(id, &items)?;
        match self.nodes.get_mut(id as usize) {
            Some(Node::List(list)) => list.extend(items),
            Some(other) => return Err(TorchError::malformed(self.op_pos, format!("APPEND to a {}", kind(other)))),
            None => return Err(self.malformed("APPEND to nothing")),
        }
        Ok(())
    }

    fn pairs(&self, items: Vec<NodeId>) -> Result<Vec<(NodeId, NodeId)>, TorchError> {
        let chunks = items.chunks_exact(2);
        if !chunks.remainder().is_empty() {
            return Err(self.malformed("odd number of dict items"));
        }
        Ok(chunks.map(|kv| (kv[0], kv[1])).collect())
    }

    fn extend_dict(&mut self, id: NodeId, pairs: Vec<(NodeId, NodeId)>) -> Result<(), TorchError> {
        let flat: Vec<NodeId> = pairs.iter().flat_map(|&(k, v)| [k, v]).collect();
        self.deepen(id, &flat)?;
        match self.nodes.get_mut(id as usize) {
            Some(Node::Dict(dict)) => dict.extend(pairs),
            Some(other) => return Err(TorchError::malformed(self.op_pos, format!("SETITEM on a {}", kind(other)))),
            None => return Err(self.malformed("SETITEM on nothing")),
        }
        Ok(())
    }

    fn memo_put(&mut self, id: u32) -> Result<(), TorchError> {
        let top = self.top()?;
        self.memo.insert(id, top);
        Ok(())
    }

    fn memo_get(&mut self, id: u32) -> Result<(), TorchError> {
        let node = *self.memo.get(&id).ok_or_else(|| self.malformed(format!("memo id {id} was never stored")))?;
        self.stack.push(node);
        Ok(())
    }

    // ---- the allowed "calls" ----

    /// `REDUCE`: only the allowed functions, evaluated here as pure descriptions.
    fn reduce(&mut self, callable: NodeId, args: NodeId) -> Result<NodeId, TorchError> {
        let global = match self.get(callable) {
            Node::Global(g) => *g,
            other => return Err(self.malformed(format!("REDUCE calls a {}, not an allowed global", kind(other)))),
        };
        let args: &[NodeId] = match self.get(args) {
            Node::Tuple(items) => items,
            other => return Err(self.malformed(format!("REDUCE arguments are a {}, not a tuple", kind(other)))),
        };
        match global {
            Global::OrderedDict if args.is_empty() => self.alloc(Node::Dict(Vec::new()), 1),
            Global::OrderedDict => Err(self.malformed("collections.OrderedDict called with arguments")),
            Global::RebuildParameter => match args.first().map(|&t| self.get(t)) {
                Some(Node::Tensor(_)) if args.len() == 3 => Ok(args[0]),
                _ => Err(self.malformed("torch._utils._rebuild_parameter needs (tensor, requires_grad, hooks)")),
            },
            Global::RebuildTensorV2 => {
                let tensor = self.rebuild_tensor(args)?;
                self.alloc(Node::Tensor(tensor), 1)
            }
            Global::StorageType(dtype) => Err(TorchError::RefusedCall(format!("torch.{}", dtype.storage_name()))),
        }
    }

    /// `_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])`.
    fn rebuild_tensor(&self, args: &[NodeId]) -> Result<TensorRef, TorchError> {
        let bad = |what: &str| self.malformed(format!("torch._utils._rebuild_tensor_v2: {what}"));
        if !(6..=7).contains(&args.len()) {
            return Err(bad(&format!("{} arguments, expected 6 or 7", args.len())));
        }
        if !matches!(*self.get(args[0]), Node::Storage(_)) {
            return Err(bad("the first argument is not a storage"));
        }
        let offset = match *self.get(args[1]) {
            Node::Int(v) if v >= 0 => v as u64,
            _ => return Err(bad("the storage offset is not a non-negative int")),
        };
        let rank = self.check_dims(args[2]).ok_or_else(|| bad("the size is not a tuple of non-negative ints"))?;
        let stride_rank =
            self.check_dims(args[3]).ok_or_else(|| bad("the stride is not a tuple of non-negative ints"))?;
        if rank != stride_rank {
            return Err(bad(&format!("{rank} sizes but {stride_rank} strides")));
        }
        if !matches!(*self.get(args[4]), Node::Bool(_)) {
            return Err(bad("requires_grad is not a bool"));
        }
        Ok(TensorRef { storage: args[0], offset, size: args[2], stride: args[3] })
    }

    /// The length of a tuple of non-negative ints of at most [`MAX_RANK`] items.
    fn check_dims(&self, id: NodeId) -> Option<usize> {
        let Node::Tuple(items) = self.get(id) else {
            return None;
        };
        let ok = items.len() <= MAX_RANK && items.iter().all(|&i| matches!(*self.get(i), Node::Int(v) if v >= 0));
        ok.then_some(items.len())
    }

    /// `BUILD` sets an object's state. State dicts use it only to give their `OrderedDict` a
    /// `_metadata` attribute (module versions), which holds no tensors: it is dropped.
    fn build(&mut self) -> Result<(), TorchError> {
        let state = self.pop()?;
        let target = self.top()?;
        match (self.get(target), self.get(state)) {
            (Node::Dict(_), Node::Dict(_) | Node::None | Node::Tuple(_)) => Ok(()),
            (t, s) => Err(self.malformed(format!("BUILD of a {} with a {} state", kind(t), kind(s)))),
        }
    }

    /// `BINPERSID` with PyTorch's storage ids: `('storage', torch.XStorage, key, location, numel)` in zip
    /// files, with a sixth item `view_metadata` (always `None` since PyTorch 1.0) in legacy files.
    fn persistent_load(&self, pid: NodeId) -> Result<Storage, TorchError> {
        let bad = |what: &str| self.malformed(format!("persistent id: {what}"));
        let Node::Tuple(items) = self.get(pid) else {
            return Err(bad("not a tuple"));
        };
        let node = |i: usize| self.get(items[i]);
        if !(5..=6).contains(&items.len()) || !matches!(node(0), Node::Str(s) if &**s == "storage") {
            return Err(bad("not a ('storage', type, key, location, numel) tuple"));
        }
        let Node::Global(Global::StorageType(dtype)) = *node(1) else {
            return Err(bad("the storage type is not a torch.*Storage class"));
        };
        if !matches!(node(2), Node::Str(_)) || !matches!(node(3), Node::Str(_)) {
            return Err(bad("the key and location are not strings"));
        }
        let numel = match *node(4) {
            Node::Int(v) if v >= 0 => v as u64,
            _ => return Err(bad("the element count is not a non-negative int")),
        };
        if items.len() == 6 && !matches!(node(5), Node::None) {
            return Err(bad("storage views (view_metadata, written before PyTorch 1.0) are not supported"));
        }
        Ok(Storage { key: items[2], dtype, numel })
    }
}

/// The allow-list. Anything else is refused by name: a state dict needs nothing more, and every other
/// global is a function or class whose call a real unpickler would run.
pub(crate) fn resolve_global(module: &str, name: &str) -> Result<Global, TorchError> {
    let global = match (module, name) {
        ("collections", "OrderedDict") => Some(Global::OrderedDict),
        ("torch._utils", "_rebuild_tensor_v2") => Some(Global::RebuildTensorV2),
        ("torch._utils", "_rebuild_parameter") => Some(Global::RebuildParameter),
        ("torch", storage) => DType::STORAGES.iter().find(|(n, _)| *n == storage).map(|&(_, d)| Global::StorageType(d)),
        _ => None,
    };
    global.ok_or_else(|| TorchError::RefusedGlobal { module: shorten(module), name: shorten(name), allowed: ALLOWED })
}

/// Keeps hostile names from flooding error messages.
fn shorten(s: &str) -> String {
    const MAX: usize = 120;
    match s.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}...", &s[..cut]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(bytes: &[u8]) -> Result<Pickle, TorchError> {
        unpickle(bytes).map(|(p, _)| p)
    }

    #[test]
    fn builds_containers_and_shares_memoised_objects() {
        // {'a': [1, -2, 3.5, 'x', None, True], 'b': <same list>} via MARK/SETITEMS, BINPUT/BINGET.
        let mut p = vec![0x80, 2, b'}', b'q', 0, b'(', b'X', 1, 0, 0, 0, b'a', b']', b'q', 1, b'('];
        p.extend([b'K', 1, b'J', 0xfe, 0xff, 0xff, 0xff, b'G']);
        p.extend(3.5f64.to_be_bytes());
        p.extend([0x8c, 1, b'x', b'N', 0x88, b'e', 0x8c, 1, b'b', b'h', 1, b'u', b'.']);
        let pk = run(&p).unwrap();
        let items = pk.dict(pk.root()).unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].1, items[1].1, "BINGET shares the list instead of copying it");
        let Node::List(list) = pk.node(items[0].1) else { panic!("not a list") };
        let kinds: Vec<_> = list.iter().map(|&i| kind(pk.node(i))).collect();
        assert_eq!(kinds, ["int", "int", "float", "str", "None", "bool"]);
        assert!(matches!(pk.node(list[1]), Node::Int(-2)));
    }

    #[test]
    fn refuses_globals_off_the_list_by_name() {
        for (module, name) in [
            ("builtins", "eval"),
            ("os", "system"),
            ("posix", "system"),
            ("torch", "load"),
            ("collections", "defaultdict"),
        ] {
            let mut p = vec![0x80, 2, b'c'];
            p.extend(format!("{module}\n{name}\n").bytes());
            p.extend(b"X\x02\x00\x00\x00ls\x85R.");
            let e = run(&p).unwrap_err().to_string();
            assert!(e.contains(&format!("refusing global {module}.{name}")), "{e}");
        }
        // STACK_GLOBAL (protocol 4) goes through the same list.
        let e = run(b"\x80\x04\x8c\x02os\x8c\x06system\x93.").unwrap_err().to_string();
        assert!(e.contains("refusing global os.system"), "{e}");
    }

    #[test]
    fn refuses_unknown_opcodes_and_bad_stacks() {
        let e = run(b"\x80\x02cos\nsystem\n").unwrap_err().to_string();
        assert!(e.contains("os.system"), "{e}");
        let e = run(b"\x80\x02(i__main__\nX\n.").unwrap_err().to_string();
        assert!(e.contains("opcode 0x69 (i) at byte 3"), "{e}");
        assert!(run(b"\x80\x02.").unwrap_err().to_string().contains("empty stack"));
        assert!(run(b"\x80\x02(t").unwrap_err().to_string().contains("truncated"));
        assert!(run(b"\x80\x02X\xff\xff\xff\xff").unwrap_err().to_string().contains("needs 4294967295 bytes"));
        assert!(run(b"\x80\x02h\x07.").unwrap_err().to_string().contains("memo id 7"));
        // A MARK hides what is below it, as in CPython.
        assert!(run(b"\x80\x02N(0a.").is_err());
    }

    #[test]
    fn deep_nesting_is_refused_without_recursion() {
        let p = [&[0x80, 2][..], &[b']'; 10_000], &[b'a'; 9_999], b"."].concat();
        let e = run(&p).unwrap_err().to_string();
        assert!(e.contains("nested deeper than 64"), "{e}");
        // Tuples built from marks are checked the same way.
        let mut p = vec![0x80, 2, b'N'];
        p.extend(std::iter::repeat_n(0x85, 100));
        p.push(b'.');
        assert!(run(&p).unwrap_err().to_string().contains("nested deeper"));
    }

    #[test]
    fn long_integers_of_any_encoded_width() {
        let long1 = |bytes: &[u8]| {
            let mut p = vec![0x80, 2, 0x8a, bytes.len() as u8];
            p.extend(bytes);
            p.push(b'.');
            let pk = run(&p).unwrap();
            match pk.node(pk.root()) {
                Node::Int(v) => Some(*v),
                _ => None,
            }
        };
        assert_eq!(long1(&[]), Some(0));
        assert_eq!(long1(&[0xff]), Some(-1));
        assert_eq!(long1(&[0, 0, 0, 0, 0, 0, 0, 0x10]), Some(1 << 60));
        assert_eq!(long1(&[0, 0, 0, 0, 0, 0, 0, 0x10, 0]), Some(1 << 60), "a redundant sign byte");
        assert_eq!(long1(&[0xff; 9]), Some(-1));
        assert_eq!(long1(&[0, 0, 0, 0, 0, 0, 0, 0x80, 0]), None, "2^63 does not fit");
        assert_eq!(long1(&[0, 0, 0, 0, 0, 0, 0, 0, 1]), None);
    }

    #[test]
    fn cycles_do_not_hang_or_overflow() {
        // l = []; l.append(l)
        let pk = run(b"\x80\x02]q\x00h\x00a.").unwrap();
        let Node::List(items) = pk.node(pk.root()) else { panic!() };
        assert_eq!(items, &[pk.root()]);
    }
}
