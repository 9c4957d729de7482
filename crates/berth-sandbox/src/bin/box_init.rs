//! The box bring-up helper as a standalone binary (the `berth` binary embeds the same code
//! behind `berth __box-init`).
fn main() {
    berth_sandbox::native::init::run()
}
