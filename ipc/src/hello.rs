//! An optional handshake that tells two ends which message types they speak: each sends
//! a protocol name and version on the control lane, and checks the peer's.
//!
//! postcard is not self-describing (see [`Received::decode`](crate::Received::decode)):
//! without a hello, two ends built against different message types exchange wrong values
//! without any error. [`Channel::hello`](crate::Channel::hello) turns that into a typed
//! [`Error::ProtocolMismatch`] on both ends, before the first user message.

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{Channel, Error, Lane};

/// The `cmd` of a hello message. It starts with `NODE_` so that the hello also travels on
/// the control lane of a Node JSON channel (where Node itself ignores it); on a postcard
/// channel it is the hello's magic value.
pub(crate) const HELLO_CMD: &str = "NODE_IPC_HELLO";

/// A protocol as [`Channel::hello`](crate::Channel::hello) announces it: a name and a
/// version, which must both be equal on the two ends.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProtocolId {
    /// The protocol's name, such as `"my-app/jobs"`.
    pub name: String,
    /// Its version; any change to the message types should change it.
    pub version: u32,
}

impl fmt::Display for ProtocolId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} version {}", self.name, self.version)
    }
}

/// What travels on the wire. The same shape serves both formats: a postcard struct whose
/// first field is the magic `cmd`, or the JSON object `{"cmd":"NODE_IPC_HELLO",...}`.
#[derive(Debug, Serialize, Deserialize)]
struct HelloMessage<'a> {
    #[serde(borrow)]
    cmd: Cow<'a, str>,
    #[serde(borrow)]
    protocol: Cow<'a, str>,
    version: u32,
}

impl Channel {
    /// Sends this end's protocol name and version on the control lane, then waits for the
    /// peer's and checks that both are equal.
    ///
    /// Both ends must call it before anything else is sent, each with its own idea of the
    /// protocol; neither waits for the other before sending, so the two hellos cross. It
    /// fails with [`Error::ProtocolMismatch`] when the peer announces another name or
    /// version, or when its first message is not a hello at all (`theirs` is then `None`),
    /// and with [`Error::Closed`] when the peer closes the channel first. After a mismatch
    /// the channel should be dropped: the peer has failed too.
    ///
    /// It is optional: a channel on which nobody calls it works as before.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), ipc::Error> {
    /// let (mut a, mut b) = ipc::Channel::pair()?;
    /// let (ours, theirs) = tokio::join!(a.hello("jobs", 2), b.hello("jobs", 3));
    /// assert!(matches!(ours, Err(ipc::Error::ProtocolMismatch { .. })));
    /// assert!(matches!(theirs, Err(ipc::Error::ProtocolMismatch { .. })));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn hello(&mut self, protocol: &str, version: u32) -> Result<(), Error> {
        let hello = HelloMessage {
            cmd: Cow::Borrowed(HELLO_CMD),
            protocol: Cow::Borrowed(protocol),
            version,
        };
        self.send_control(&hello, Vec::new()).await?;
        let ours = ProtocolId {
            name: protocol.to_owned(),
            version,
        };
        let Some(first) = self.recv().await? else {
            return Err(Error::Closed);
        };
        let theirs = match first.lane() {
            Lane::Control => first
                .decode::<HelloMessage<'_>>()
                .ok()
                .filter(|m| m.cmd == HELLO_CMD)
                .map(|m| ProtocolId {
                    name: m.protocol.into_owned(),
                    version: m.version,
                }),
            Lane::User => None,
        };
        match theirs {
            Some(theirs) if theirs == ours => Ok(()),
            theirs => Err(Error::ProtocolMismatch {
                ours: Box::new(ours),
                theirs: theirs.map(Box::new),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    /// Runs a hello on both ends of a pair and returns both results.
    fn hellos(a: (&str, u32), b: (&str, u32)) -> (Result<(), Error>, Result<(), Error>) {
        runtime().block_on(async {
            let (mut x, mut y) = Channel::pair().expect("pair");
            tokio::join!(x.hello(a.0, a.1), y.hello(b.0, b.1))
        })
    }

    #[track_caller]
    fn check_mismatch(result: Result<(), Error>, ours: (&str, u32), theirs: Option<(&str, u32)>) {
        let id = |(name, version): (&str, u32)| ProtocolId {
            name: name.into(),
            version,
        };
        match result {
            Err(Error::ProtocolMismatch { ours: o, theirs: t }) => {
                assert_eq!(*o, id(ours));
                assert_eq!(t.map(|t| *t), theirs.map(id));
            }
            other => panic!("expected a mismatch, got {other:?}"),
        }
    }

    #[test]
    fn equal_protocols_agree_and_the_channel_goes_on() {
        runtime().block_on(async {
            let (mut a, mut b) = Channel::pair().expect("pair");
            let (x, y) = tokio::join!(a.hello("jobs", 1), b.hello("jobs", 1));
            x.expect("a agrees");
            y.expect("b agrees");
            a.send(&7u32).await.expect("send");
            let msg = b.recv().await.expect("recv").expect("a message");
            assert_eq!(msg.decode::<u32>().expect("decode"), 7);
        });
    }

    #[test]
    fn another_version_is_a_mismatch_on_both_ends() {
        let (a, b) = hellos(("jobs", 1), ("jobs", 2));
        check_mismatch(a, ("jobs", 1), Some(("jobs", 2)));
        check_mismatch(b, ("jobs", 2), Some(("jobs", 1)));
    }

    #[test]
    fn another_name_is_a_mismatch() {
        let (a, _) = hellos(("jobs", 1), ("mail", 1));
        check_mismatch(a, ("jobs", 1), Some(("mail", 1)));
    }

    #[test]
    fn a_peer_that_sends_no_hello_is_a_mismatch() {
        runtime().block_on(async {
            let (mut a, mut b) = Channel::pair().expect("pair");
            b.send(&"not a hello").await.expect("send");
            check_mismatch(a.hello("jobs", 1).await, ("jobs", 1), None);
            // A control message of another protocol is not a hello either.
            b.send_control(&(1u8, 2u8), Vec::new()).await.expect("send");
            check_mismatch(a.hello("jobs", 1).await, ("jobs", 1), None);
        });
    }

    #[test]
    fn a_peer_that_closes_first_is_closed() {
        runtime().block_on(async {
            let (mut a, b) = Channel::pair().expect("pair");
            drop(b);
            let err = a.hello("jobs", 1).await.unwrap_err();
            assert!(matches!(err, Error::Closed), "{err:?}");
        });
    }

    #[test]
    fn the_mismatch_message_names_both_protocols() {
        let (a, _) = hellos(("jobs", 1), ("jobs", 2));
        assert_eq!(
            a.unwrap_err().to_string(),
            "protocol mismatch: this end speaks \"jobs\" version 1, the peer \"jobs\" version 2"
        );
    }
}
