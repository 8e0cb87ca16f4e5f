//! Helpers shared by the integration tests and their helper binaries.

pub mod sys;

pub mod ipc_proto {
    //! Messages of the `ipc_fd_child` helper.

    use serde::{Deserialize, Serialize};

    /// Parent to child.
    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    pub enum ToChild {
        /// The attached descriptor is a listening TCP socket: accept one connection on it.
        Listener,
    }

    /// Child to parent.
    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    pub enum FromChild {
        /// The child accepted a connection from `peer_port` and read `line` from it.
        Accepted {
            /// The client's source port.
            peer_port: u16,
            /// The first line the client sent.
            line: String,
        },
    }
}
