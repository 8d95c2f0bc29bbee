//! The steps of a child's life after fork, in order. The child marks each
//! as it ends (the delivery client marks its own), and the benchmark times
//! them (`child::main_traced`). Its own module, so `child` and `delivery`
//! both import it and neither imports the other's vocabulary.

/// One step of a child, marked when it ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Its database connection is open.
    Opened,
    /// It holds a lease (or found nothing: the last step then).
    Leased,
    /// The request is built and signed.
    Prepared,
    /// The connection to the endpoint is up (TCP, and TLS for https).
    Connected,
    /// The answer came, or the answer window closed.
    Answered,
    /// The outcome is recorded.
    Recorded,
}
