//! `cargo xtask preprocess`: image folder or IDX files -> sharded dataset (swav-data).

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("preprocess is not built yet")
}
