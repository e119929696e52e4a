//! Hosts for multi-host tests: Linux network namespaces joined by veth pairs on one
//! bridge, created by a test and removed when its [`Net`] is dropped (also on panic).
//!
//! The bridge lives in a namespace of its own (the "switch"); each host namespace has
//! one veth into it, and the test process itself (the root namespace: the message
//! server, the monitor, the clients) has one too, so it reaches every host directly.
//! A host is cut off by taking its port on the switch down: its connections then hang
//! without a reset, as across a real partition. Names and the /24 subnet are unique per
//! test (process id and a counter), so tests running side by side never collide.
//! Needs root and iproute2's `ip`; [`Net::create`] says why it cannot and returns `None`
//! otherwise, so that a test can skip with a message.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// One host: a network namespace with one address.
pub struct Host {
    /// The namespace's name.
    pub netns: String,
    /// The host's address on the test network.
    pub addr: Ipv4Addr,
    /// The host's port on the switch.
    port: String,
}

/// A test network of hosts on one bridge.
pub struct Net {
    switch: String,
    hosts: Vec<Host>,
    /// The test process's own port on the switch and its address.
    outside_port: String,
    pub outside_addr: Ipv4Addr,
    outside_link: String,
}

impl Net {
    /// `hosts` namespaces on one bridge, plus the test process's own link to it; `None`
    /// (with the reason printed) where namespaces cannot be made (not root, no `ip`).
    pub fn create(hosts: usize) -> Option<Net> {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        // Interface names are at most 15 bytes: "cm" + 5 + 2 + "h" + index.
        let tag = format!("cm{:05}{:02}", pid % 100_000, n % 100);
        let subnet = [10, 100 + (pid % 100) as u8, (n % 250) as u8];
        let switch = format!("{tag}sw");
        if let Err(why) = ip(&["netns", "add", &switch]) {
            eprintln!("SKIPPED: cannot create network namespaces ({why}); needs root and iproute2");
            return None;
        }
        let mut net = Net {
            switch,
            hosts: Vec::new(),
            outside_port: format!("{tag}so"),
            outside_addr: Ipv4Addr::new(subnet[0], subnet[1], subnet[2], 254),
            outside_link: format!("{tag}o"),
        };
        net.build(&tag, subnet, hosts)
            .unwrap_or_else(|why| panic!("test network: {why}"));
        Some(net)
    }

    fn build(&mut self, tag: &str, subnet: [u8; 3], hosts: usize) -> Result<(), String> {
        let sw = self.switch.clone();
        ipn(&sw, &["link", "add", "br0", "type", "bridge"])?;
        ipn(&sw, &["link", "set", "br0", "up"])?;
        for i in 0..hosts {
            let host = Host {
                netns: format!("{tag}h{i}"),
                addr: Ipv4Addr::new(subnet[0], subnet[1], subnet[2], i as u8 + 1),
                port: format!("{tag}s{i}"),
            };
            let link = format!("{tag}h{i}");
            ip(&["netns", "add", &host.netns])?;
            self.hosts.push(host);
            let host = self.hosts.last().unwrap();
            ip(&[
                "link", "add", &link, "type", "veth", "peer", "name", &host.port, "netns", &sw,
            ])?;
            ip(&["link", "set", &link, "netns", &host.netns])?;
            ipn(&sw, &["link", "set", &host.port, "master", "br0", "up"])?;
            ipn(
                &host.netns,
                &["addr", "add", &format!("{}/24", host.addr), "dev", &link],
            )?;
            ipn(&host.netns, &["link", "set", &link, "up"])?;
            ipn(&host.netns, &["link", "set", "lo", "up"])?;
        }
        ip(&[
            "link",
            "add",
            &self.outside_link,
            "type",
            "veth",
            "peer",
            "name",
            &self.outside_port,
            "netns",
            &sw,
        ])?;
        ipn(
            &sw,
            &["link", "set", &self.outside_port, "master", "br0", "up"],
        )?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", self.outside_addr),
            "dev",
            &self.outside_link,
        ])?;
        ip(&["link", "set", &self.outside_link, "up"])?;
        Ok(())
    }

    /// Host `i`.
    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    /// A command that runs `program` on host `i`: `ip netns exec` execs it, so the
    /// child's pid is the program's.
    pub fn command(&self, i: usize, program: &str) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.hosts[i].netns])
            .arg(program);
        command
    }

    /// Cuts host `i` off from every other host and from the test process.
    pub fn cut(&self, i: usize) {
        self.set_port(&self.hosts[i].port, "down");
    }

    /// Joins host `i` again.
    pub fn heal(&self, i: usize) {
        self.set_port(&self.hosts[i].port, "up");
    }

    /// Cuts the test process (message server, monitor, clients) off from every host.
    pub fn cut_outside(&self) {
        self.set_port(&self.outside_port, "down");
    }

    /// Joins the test process again.
    pub fn heal_outside(&self) {
        self.set_port(&self.outside_port, "up");
    }

    fn set_port(&self, port: &str, state: &str) {
        ipn(&self.switch, &["link", "set", port, state]).unwrap();
    }

    /// Makes a loopback listener of the test process (`127.0.0.1:port`) reachable from
    /// the hosts at the returned address: a thread forwards each connection.
    pub fn expose(&self, port: u16) -> SocketAddr {
        let listener = TcpListener::bind((self.outside_addr, 0)).unwrap();
        let exposed = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for incoming in listener.incoming() {
                let Ok(incoming) = incoming else { return };
                let Ok(target) = TcpStream::connect(("127.0.0.1", port)) else {
                    continue;
                };
                pipe(incoming.try_clone().unwrap(), target.try_clone().unwrap());
                pipe(target, incoming);
            }
        });
        exposed
    }

    /// `url` (`http://127.0.0.1:PORT/...`, a listener of the test process) as the hosts
    /// reach it, through [`Net::expose`].
    pub fn expose_url(&self, url: &str) -> String {
        let port: u16 = url
            .trim_start_matches("http://127.0.0.1:")
            .split('/')
            .next()
            .and_then(|port| port.parse().ok())
            .expect("a loopback http URL with a port");
        let exposed = self.expose(port);
        url.replace(&format!("127.0.0.1:{port}"), &exposed.to_string())
    }
}

/// Copies `from` to `to` on a thread until either side closes.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf) {
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veth ends and so their peers, the test
        // process's link included.
        for host in &self.hosts {
            let _ = ip(&["netns", "del", &host.netns]);
        }
        let _ = ip(&["netns", "del", &self.switch]);
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

fn ipn(netns: &str, args: &[&str]) -> Result<(), String> {
    let mut all = vec!["-n", netns];
    all.extend_from_slice(args);
    ip(&all)
}

/// Connects from the test process to `addr` within `limit`.
pub fn connect(addr: SocketAddr, limit: Duration) -> std::io::Result<TcpStream> {
    TcpStream::connect_timeout(&addr, limit)
}
