//! The cluster HTTP server demo (not built yet: it exits with an error).

fn main() {
    eprintln!("httpd-demo is not built yet");
    std::process::exit(2);
}
