//! Reading kernel sources: the `extern "C" __global__` signatures (for the generated dispatch and for
//! checking launches), and the two rewrites the host compiler needs (hoisted `#include`s, and
//! `extern __shared__` arrays turned into the per-block dynamic shared buffer).

use crate::EmuError;

/// Element type of a device buffer (what a kernel pointer parameter points to).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Elem {
    /// `float`.
    F32,
    /// `__nv_bfloat16`, stored as its 16 bits.
    Bf16,
    /// `int`.
    I32,
    /// `unsigned int`.
    U32,
    /// `unsigned char`.
    U8,
    /// `long long`.
    I64,
    /// `unsigned long long`.
    U64,
}

impl Elem {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Elem::U8 => 1,
            Elem::Bf16 => 2,
            Elem::F32 | Elem::I32 | Elem::U32 => 4,
            Elem::I64 | Elem::U64 => 8,
        }
    }

    /// The code the C++ side uses (`emu::Elem` in shim.hpp).
    pub(crate) fn code(self) -> u32 {
        match self {
            Elem::F32 => 0,
            Elem::Bf16 => 1,
            Elem::I32 => 2,
            Elem::U32 => 3,
            Elem::U8 => 4,
            Elem::I64 => 5,
            Elem::U64 => 6,
        }
    }
}

/// Type of a scalar kernel parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scalar {
    /// `int`.
    I32,
    /// `unsigned int`.
    U32,
    /// `float`.
    F32,
    /// `long long`.
    I64,
    /// `unsigned long long` (or `size_t`).
    U64,
}

/// What one kernel parameter is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ParamKind {
    /// A pointer to device memory; `writable` is false for `const T*`.
    Ptr {
        /// What it points to.
        elem: Elem,
        /// False for a pointer to const.
        writable: bool,
    },
    /// A value.
    Scalar(Scalar),
}

/// One kernel parameter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Param {
    /// The parameter's name in the source.
    pub name: String,
    /// Its type.
    pub kind: ParamKind,
}

/// The signature of one `extern "C" __global__` function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelSig {
    /// The kernel's (unmangled) name.
    pub name: String,
    /// Its parameters, in order.
    pub params: Vec<Param>,
}

/// Blanks out comments (keeping line breaks, so that line numbers stay right).
pub(crate) fn strip_comments(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                out.push(b' ');
                i += 1;
            }
        } else if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
            out.extend_from_slice(b"  ");
            i += 2;
            while i < b.len() && !(b[i] == b'*' && b.get(i + 1) == Some(&b'/')) {
                out.push(if b[i] == b'\n' { b'\n' } else { b' ' });
                i += 1;
            }
            out.extend_from_slice(b"  ");
            i = (i + 2).min(b.len());
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    // Only ASCII bytes were replaced by ASCII bytes: still UTF-8.
    String::from_utf8(out).unwrap_or_default()
}

/// Every `extern "C" __global__` function of `src`, in source order.
pub fn parse_kernels(src: &str) -> Result<Vec<KernelSig>, EmuError> {
    let text = strip_comments(src);
    let mut kernels = Vec::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("extern \"C\"") {
        rest = &rest[at + "extern \"C\"".len()..];
        let head_end = rest.find(['(', ';', '{']).unwrap_or(rest.len());
        let mut head = rest[..head_end].to_string();
        if !head.split_whitespace().any(|t| t == "__global__") {
            continue;
        }
        // `__launch_bounds__(...)` sits between `void` and the name: skip its parentheses.
        let mut body = rest;
        if let Some(lb) = head.find("__launch_bounds__") {
            let open = lb + rest[lb..].find('(').unwrap_or(0);
            let close = matching(rest, open).ok_or_else(|| EmuError::Parse("unbalanced __launch_bounds__".into()))?;
            body = &rest[close + 1..];
            let next = body.find('(').unwrap_or(body.len());
            head = format!("{} {}", &rest[..lb], &body[..next]);
            body = &body[next..];
        } else {
            body = &body[head_end..];
        }
        let name = head
            .split_whitespace()
            .last()
            .ok_or_else(|| EmuError::Parse("a kernel without a name".into()))?
            .to_string();
        if !body.starts_with('(') {
            return Err(EmuError::Parse(format!("kernel {name}: no parameter list")));
        }
        let close =
            matching(body, 0).ok_or_else(|| EmuError::Parse(format!("kernel {name}: unbalanced parentheses")))?;
        let params =
            split_params(&body[1..close]).into_iter().map(|p| parse_param(&name, &p)).collect::<Result<Vec<_>, _>>()?;
        kernels.push(KernelSig { name, params });
        rest = &body[close..];
    }
    Ok(kernels)
}

/// The index of the parenthesis closing the one at `open`.
fn matching(s: &str, open: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c) in s[open..].char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return Some(open + i);
                }
            }
            _ => {}
        }
    }
    None
}

fn split_params(list: &str) -> Vec<String> {
    let list = list.trim();
    if list.is_empty() || list == "void" {
        return Vec::new();
    }
    list.split(',').map(|p| p.trim().to_string()).collect()
}

fn parse_param(kernel: &str, p: &str) -> Result<Param, EmuError> {
    let spaced = p.replace('*', " * ");
    let tokens: Vec<&str> = spaced.split_whitespace().collect();
    let Some((&name, ty)) = tokens.split_last() else {
        return Err(EmuError::Parse(format!("kernel {kernel}: empty parameter")));
    };
    let pointers = ty.iter().filter(|&&t| t == "*").count();
    let writable = !ty.iter().take_while(|&&t| t != "*").any(|&t| t == "const");
    let base: Vec<&str> = ty
        .iter()
        .copied()
        .filter(|t| !matches!(*t, "*" | "const" | "volatile" | "__restrict__" | "__restrict" | "restrict"))
        .collect();
    let unsupported = || {
        EmuError::Parse(format!(
            "kernel {kernel}: parameter `{p}` has a type the emulator does not know (use float, \
             __nv_bfloat16, int, unsigned int, unsigned char, long long, unsigned long long or pointers \
             to them)"
        ))
    };
    let base = base.join(" ");
    let kind = match (pointers, base.as_str()) {
        (1, b) => ParamKind::Ptr {
            elem: match b {
                "float" => Elem::F32,
                "__nv_bfloat16" => Elem::Bf16,
                "int" | "signed" | "signed int" | "int32_t" => Elem::I32,
                "unsigned" | "unsigned int" | "uint32_t" => Elem::U32,
                "unsigned char" | "uint8_t" => Elem::U8,
                "long long" | "long long int" | "int64_t" | "long" => Elem::I64,
                "unsigned long long" | "uint64_t" | "size_t" | "unsigned long" => Elem::U64,
                _ => return Err(unsupported()),
            },
            writable,
        },
        (0, b) => ParamKind::Scalar(match b {
            "float" => Scalar::F32,
            "int" | "signed" | "signed int" | "int32_t" => Scalar::I32,
            "unsigned" | "unsigned int" | "uint32_t" => Scalar::U32,
            "long long" | "long long int" | "int64_t" | "long" => Scalar::I64,
            "unsigned long long" | "uint64_t" | "size_t" | "unsigned long" => Scalar::U64,
            _ => return Err(unsupported()),
        }),
        _ => return Err(unsupported()),
    };
    Ok(Param { name: name.to_string(), kind })
}

/// The source as the host compiler gets it: `#include` lines blanked (the caller puts them before the
/// namespace that wraps the source) and each `extern __shared__ T name[];` replaced, on the same line,
/// by a pointer to the block's dynamic shared memory. Such arrays must be declared inside a function.
pub(crate) fn rewrite_for_host(src: &str) -> (String, Vec<String>) {
    let mut includes = Vec::new();
    let mut out = String::with_capacity(src.len());
    for line in src.lines() {
        let t = line.trim_start();
        if t.starts_with("#include") {
            includes.push(t.to_string());
            out.push('\n');
            continue;
        }
        out.push_str(&rewrite_dynamic_shared(line));
        out.push('\n');
    }
    (out, includes)
}

fn rewrite_dynamic_shared(line: &str) -> String {
    let Some(at) = line.find("extern __shared__") else {
        return line.to_string();
    };
    let Some(semi) = line[at..].find(';').map(|s| at + s) else {
        return line.to_string();
    };
    let decl = &line[at + "extern __shared__".len()..semi];
    // Drop `__align__(n)`: the buffer is 16-byte aligned anyway.
    let decl = match decl.find("__align__(") {
        Some(a) => {
            let close = decl[a..].find(')').map(|c| a + c + 1).unwrap_or(decl.len());
            format!("{}{}", &decl[..a], &decl[close..])
        }
        None => decl.to_string(),
    };
    let decl = decl.replace("[]", " ");
    let mut tokens: Vec<&str> = decl.split_whitespace().collect();
    let Some(name) = tokens.pop() else {
        return line.to_string();
    };
    let ty = tokens.join(" ");
    format!("{}{ty}* {name} = reinterpret_cast<{ty}*>(emu::dynamic_shared());{}", &line[..at], &line[semi + 1..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_signatures_with_launch_bounds_comments_and_qualifiers() {
        let src = r#"
            // extern "C" __global__ void commented(int x) {}
            #include <cuda_bf16.h>
            extern "C" __global__ void __launch_bounds__(256, 2)
                k1(const float* __restrict__ x, __nv_bfloat16 *y, int n, unsigned int m, float s,
                   long long a, unsigned long long b, const unsigned char* c) { }
            extern "C" __device__ void not_a_kernel(int x) {}
            extern "C" __global__ void k2() {}
        "#;
        let k = parse_kernels(src).unwrap();
        assert_eq!(k.len(), 2);
        assert_eq!(k[0].name, "k1");
        let kinds: Vec<ParamKind> = k[0].params.iter().map(|p| p.kind).collect();
        assert_eq!(
            kinds,
            vec![
                ParamKind::Ptr { elem: Elem::F32, writable: false },
                ParamKind::Ptr { elem: Elem::Bf16, writable: true },
                ParamKind::Scalar(Scalar::I32),
                ParamKind::Scalar(Scalar::U32),
                ParamKind::Scalar(Scalar::F32),
                ParamKind::Scalar(Scalar::I64),
                ParamKind::Scalar(Scalar::U64),
                ParamKind::Ptr { elem: Elem::U8, writable: false },
            ]
        );
        assert_eq!(k[0].params[1].name, "y");
        assert_eq!(k[1].name, "k2");
        assert!(k[1].params.is_empty());
    }

    #[test]
    fn rejects_unknown_parameter_types() {
        let err = parse_kernels("extern \"C\" __global__ void k(float4* x) {}").unwrap_err();
        assert!(err.to_string().contains("float4"), "{err}");
    }

    #[test]
    fn rewrites_includes_and_dynamic_shared_memory_on_the_same_lines() {
        let src = "#include <cuda_bf16.h>\nvoid f() {\n    extern __shared__ __align__(16) float smem[]; int a;\n}\n";
        let (out, inc) = rewrite_for_host(src);
        assert_eq!(inc, vec!["#include <cuda_bf16.h>".to_string()]);
        assert_eq!(out.lines().count(), src.lines().count());
        assert!(out.contains("float* smem = reinterpret_cast<float*>(emu::dynamic_shared()); int a;"), "{out}");
    }
}
