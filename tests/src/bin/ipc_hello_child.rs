//! Helper for the ipc integration tests: takes its channel from the environment and runs
//! `Channel::hello` with the protocol name and version given as its two arguments.
//!
//! Prints `agreed` and exits 0, or prints the error and exits 4.

#![allow(clippy::print_stdout)]

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let name = args.next().expect("a protocol name");
    let version: u32 = args.next().expect("a version").parse()?;
    let mut channel = ipc::Channel::from_env()?.expect("a channel from the parent");
    match channel.hello(&name, version).await {
        Ok(()) => println!("agreed"),
        Err(err) => {
            println!("error: {err}");
            std::process::exit(4);
        }
    }
    Ok(())
}
