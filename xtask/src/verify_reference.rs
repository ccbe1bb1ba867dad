//! `cargo xtask verify-reference <file.safetensors>...`: run PyTorch reference cases, print relative errors.

#[derive(clap::Args)]
pub struct Args {
    /// Reference case files (safetensors with a `kind` in their metadata).
    #[arg(required = true)]
    files: Vec<std::path::PathBuf>,
}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("verify-reference is not built yet")
}
