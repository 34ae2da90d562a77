//! A PUT with ACK and a GET with REPLY over `lo`, printing every event.
//!
//! The "server" side attaches two MDs on portal 10: one that takes PUTs
//! (match bits 1), one that serves GETs (match bits 2). The "client" side
//! binds an MD with 1 KiB of data and PUTs it with an ACK, then binds an
//! empty MD and GETs the server's data into it.

use std::time::Duration;

use lnet::{AckReq, EventQueue, InsPos, Md, MdOptions, ProcessId, Threshold, Unlink};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let lnet = lnd_loopback::builder().build()?;
    let me = lnet.id();
    println!("node {me} up, NIDs {:?}", lnet.nids());

    let events = EventQueue::new();
    let portal = 10;
    lnet.attach(
        portal,
        ProcessId::ANY,
        1,
        0,
        Unlink::Unlink,
        InsPos::Tail,
        Md::new(vec![0u8; 1024])
            .options(MdOptions::OP_PUT)
            .user_ptr(1)
            .handler(events.handler()),
    )?;
    let served: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    lnet.attach(
        portal,
        ProcessId::ANY,
        2,
        0,
        Unlink::Unlink,
        InsPos::Tail,
        Md::new(served.clone())
            .options(MdOptions::OP_GET)
            .user_ptr(2)
            .handler(events.handler()),
    )?;

    let data: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
    let put_md = lnet.md_bind(
        Md::new(data.clone())
            .threshold(Threshold::Finite(2))
            .user_ptr(3)
            .handler(events.handler()),
    )?;
    lnet.put(put_md, AckReq::Ack, me, portal, 1, 0, 0xfeed)?;

    let get_md = lnet.md_bind(
        Md::new(vec![0u8; 4096])
            .threshold(Threshold::Finite(2))
            .user_ptr(4)
            .handler(events.handler()),
    )?;
    lnet.get(get_md, me, portal, 2, 0)?;

    let mut finals = 0;
    while finals < 4 {
        let Some(ev) = events.recv_timeout(Duration::from_secs(10)) else {
            return Err("timed out waiting for events".into());
        };
        println!(
            "{:?}: md {} initiator {} target {} portal {} bits {:#x} rlen {} mlen {} off {} hdr_data {:#x} status {:?} unlinked {}",
            ev.kind,
            ev.user_ptr,
            ev.initiator,
            ev.target,
            ev.pt_index,
            ev.match_bits,
            ev.rlength,
            ev.mlength,
            ev.offset,
            ev.hdr_data,
            ev.status,
            ev.unlinked
        );
        if let Some(b) = ev.buffer {
            let v = b.into_vec();
            match ev.user_ptr {
                1 => assert_eq!(v, data, "PUT data"),
                4 => assert_eq!(v, served, "GET data"),
                _ => {}
            }
            finals += 1;
        }
    }
    let c = lnet.counters();
    println!(
        "messages sent {} received {} dropped {}",
        c.msgs.sent(),
        c.msgs.received(),
        c.msgs.dropped()
    );
    Ok(())
}
