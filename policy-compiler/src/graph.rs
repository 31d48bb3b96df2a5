//! The segment connectivity picture (`policy-compiler graph`): segments as nodes, an edge from
//! source to destination labelled with the ports the rules allow, as Graphviz DOT, Mermaid, or
//! an SVG drawn here (nodes on a circle, straight edges) so no Graphviz is needed.
//!
//! Built on [`Reachability`], so on the reference evaluator. To keep the picture readable:
//! - essential traffic (`defaults.yaml` `essential_traffic`), which reaches every judged segment
//!   from anywhere, is said once in the legend, not drawn on every edge;
//! - traffic inside a segment is a note on its node (only when it is not "everything", the
//!   `intra: allow` default);
//! - an edge from a CIDR node shows what the CIDR adds to what its segment already has;
//! - traffic to an unenforced `world` is not judged, so it has no edges (said in the legend).

use std::f64::consts::PI;
use std::fmt::Write as _;

use crate::model::{Mode, Policy, WORLD};
use crate::port_set::PortSet;
use crate::reachability::Reachability;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum NodeKind {
    Segment,
    World,
    /// A source class named by a rule CIDR.
    Cidr,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GraphNode {
    pub name: String,
    pub kind: NodeKind,
    pub mode: Mode,
    /// What members of the segment may send each other, when it is not everything.
    pub intra: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GraphEdge {
    /// Indexes into [`Graph::nodes`].
    pub from: usize,
    pub to: usize,
    pub ports: PortSet,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Graph {
    pub title: String,
    pub nodes: Vec<GraphNode>,
    pub edges: Vec<GraphEdge>,
    /// The legend, one line each.
    pub notes: Vec<String>,
}

impl Graph {
    pub fn of(policy: &Policy) -> Graph {
        let reachability = Reachability::of(policy);
        let essential = PortSet::from_port_matches(&policy.settings().essential_traffic);
        let mut nodes: Vec<GraphNode> = policy
            .segments()
            .iter()
            .map(|segment| GraphNode {
                name: segment.name.clone(),
                kind: NodeKind::Segment,
                mode: segment.mode,
                intra: None,
            })
            .collect();
        let mut edges = Vec::new();
        let node_index = |nodes: &mut Vec<GraphNode>, name: &str, kind: NodeKind| {
            if let Some(found) = nodes.iter().position(|node| node.name == name) {
                return found;
            }
            let mode = if kind == NodeKind::World {
                policy.world_mode()
            } else {
                Mode::Enforce
            };
            nodes.push(GraphNode {
                name: name.to_string(),
                kind,
                mode,
                intra: None,
            });
            nodes.len() - 1
        };
        for (source, row) in reachability.sources.iter().zip(&reachability.access) {
            // A CIDR class gets what its segment gets, and more: draw only the more.
            let base_row = reachability
                .sources
                .iter()
                .position(|other| other.cidr.is_none() && other.segment == source.segment)
                .filter(|_| source.cidr.is_some())
                .map(|position| &reachability.access[position]);
            for (column, (destination, access)) in
                reachability.destinations.iter().zip(row).enumerate()
            {
                if destination.name == WORLD && destination.mode == Mode::Unenforced {
                    continue;
                }
                let destination_kind = if destination.name == WORLD {
                    NodeKind::World
                } else {
                    NodeKind::Segment
                };
                let mut ports = access.allowed.difference(&essential);
                if let Some(base) = base_row {
                    ports = ports.difference(&base[column].allowed);
                }
                let is_intra = source.cidr.is_none() && source.segment == destination.name;
                // Between two `world` addresses is not a segment's inside: no note.
                if is_intra && destination.name == WORLD {
                    continue;
                }
                if is_intra {
                    let target = node_index(&mut nodes, &destination.name, destination_kind);
                    nodes[target].intra = if access.allowed.is_everything() {
                        None
                    } else if ports.is_empty() {
                        Some("intra: deny".to_string())
                    } else {
                        Some(format!("intra: {ports}"))
                    };
                    continue;
                }
                if ports.is_empty() {
                    continue;
                }
                let kind = match (&source.cidr, source.segment.as_str()) {
                    (Some(_), _) => NodeKind::Cidr,
                    (None, WORLD) => NodeKind::World,
                    (None, _) => NodeKind::Segment,
                };
                let from = node_index(&mut nodes, &source.label, kind);
                let to = node_index(&mut nodes, &destination.name, destination_kind);
                edges.push(GraphEdge { from, to, ports });
            }
        }
        if policy.world_mode() != Mode::Unenforced {
            node_index(&mut nodes, WORLD, NodeKind::World);
        }
        let mut notes = vec![
            "Edges: traffic the rules allow (TCP/UDP destination ports, ICMP types).".to_string(),
        ];
        if !essential.is_empty() {
            notes.push(format!(
                "Not drawn: essential traffic to every judged segment from anywhere ({essential})."
            ));
        }
        if nodes.iter().any(|node| node.mode == Mode::Monitor) {
            notes.push(
                "Dashed: monitor mode; traffic without a rule passes there, reported as audit."
                    .to_string(),
            );
        }
        if nodes.iter().any(|node| node.kind == NodeKind::Cidr) {
            notes.push(
                "CIDR nodes: addresses a rule names by prefix; edges show what the prefix adds."
                    .to_string(),
            );
        }
        if policy.world_mode() == Mode::Unenforced {
            notes.push(
                "world = addresses in no segment; traffic to world is not judged (unenforced)."
                    .to_string(),
            );
        }
        let revision = policy.revision();
        Graph {
            title: format!(
                "Segment connectivity (revision {})",
                revision.get(..12).unwrap_or(revision)
            ),
            nodes,
            edges,
            notes,
        }
    }

    fn node_label(node: &GraphNode) -> Vec<String> {
        let mut lines = vec![node.name.clone()];
        match (node.kind, node.mode) {
            (_, Mode::Monitor) => lines.push("(monitor)".to_string()),
            (NodeKind::World, Mode::Enforce) => lines.push("(enforce)".to_string()),
            (NodeKind::World, Mode::Unenforced) => lines.push("(not enforced)".to_string()),
            _ => {}
        }
        if let Some(intra) = &node.intra {
            lines.push(intra.clone());
        }
        lines
    }

    pub fn to_dot(&self) -> String {
        // Escapes each piece; `\n` (centred) and `\l` (left-aligned) line breaks are added after.
        let escape = |text: &str| text.replace('\\', "\\\\").replace('"', "\\\"");
        let mut out = String::new();
        let _ = writeln!(out, "digraph segments {{");
        let legend: String = std::iter::once(&self.title)
            .chain(&self.notes)
            .map(|line| format!("{}\\l", escape(line)))
            .collect();
        let _ = writeln!(
            out,
            "  graph [rankdir=LR, labelloc=b, labeljust=l, fontname=\"Helvetica\", label=\"{legend}\"];"
        );
        let _ = writeln!(
            out,
            "  node [shape=box, style=rounded, fontname=\"Helvetica\"];"
        );
        let _ = writeln!(out, "  edge [fontname=\"Helvetica\", fontsize=10];");
        for node in &self.nodes {
            let label: Vec<String> = Self::node_label(node)
                .iter()
                .map(|line| escape(line))
                .collect();
            let mut attributes = vec![format!("label=\"{}\"", label.join("\\n"))];
            if node.mode == Mode::Monitor {
                attributes.push("style=\"rounded,dashed\"".to_string());
            }
            if node.kind != NodeKind::Segment {
                attributes.push("shape=ellipse".to_string());
            }
            let _ = writeln!(
                out,
                "  \"{}\" [{}];",
                escape(&node.name),
                attributes.join(", ")
            );
        }
        for edge in &self.edges {
            let _ = writeln!(
                out,
                "  \"{}\" -> \"{}\" [label=\"{}\"];",
                escape(&self.nodes[edge.from].name),
                escape(&self.nodes[edge.to].name),
                escape(&edge.ports.to_string())
            );
        }
        let _ = writeln!(out, "}}");
        out
    }

    pub fn to_mermaid(&self) -> String {
        // Mermaid has no escape for `"` inside a quoted label but the `#quot;` entity.
        let text = |text: &str| text.replace('"', "#quot;");
        let mut out = String::new();
        let _ = writeln!(out, "---\ntitle: {}\n---", text(&self.title));
        let _ = writeln!(out, "flowchart LR");
        for (index, node) in self.nodes.iter().enumerate() {
            let label = text(&Self::node_label(node).join("<br/>"));
            let shape = if node.kind == NodeKind::Segment {
                format!("[\"{label}\"]")
            } else {
                format!("([\"{label}\"])")
            };
            let class = if node.mode == Mode::Monitor {
                ":::monitor"
            } else {
                ""
            };
            let _ = writeln!(out, "  n{index}{shape}{class}");
        }
        for edge in &self.edges {
            let _ = writeln!(
                out,
                "  n{} -->|\"{}\"| n{}",
                edge.from,
                text(&edge.ports.to_string()),
                edge.to
            );
        }
        let _ = writeln!(out, "  classDef monitor stroke-dasharray: 5 5");
        for note in &self.notes {
            let _ = writeln!(out, "  %% {note}");
        }
        out
    }

    /// A standalone SVG: nodes on a circle, straight edges with arrowheads and port labels.
    pub fn to_svg(&self) -> String {
        svg::render(self)
    }
}

mod svg {
    use super::*;

    const FONT_SIZE: f64 = 13.0;
    const LABEL_FONT_SIZE: f64 = 11.0;
    /// Average glyph width of a sans-serif font, as a fraction of its size.
    const GLYPH_WIDTH: f64 = 0.6;
    const LINE_HEIGHT: f64 = 1.3;
    const MARGIN: f64 = 90.0;
    /// Longest edge-label line before it wraps at a comma.
    const LABEL_LINE_CHARS: usize = 26;
    /// How far an edge bends away from a node in its way, or from its reverse edge.
    const CLEARANCE: f64 = 18.0;
    const PAIR_BEND: f64 = 34.0;
    const PALETTE: [&str; 8] = [
        "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2",
    ];

    #[derive(Clone, Copy)]
    struct Rect {
        x: f64,
        y: f64,
        half_width: f64,
        half_height: f64,
    }

    impl Rect {
        fn overlap(&self, other: &Rect) -> f64 {
            let width = (self.half_width + other.half_width) - (self.x - other.x).abs();
            let height = (self.half_height + other.half_height) - (self.y - other.y).abs();
            if width > 0.0 && height > 0.0 {
                width * height
            } else {
                0.0
            }
        }

        fn radius(&self) -> f64 {
            self.half_width.hypot(self.half_height)
        }

        /// Where the ray from the centre towards (dx, dy) leaves the rectangle.
        fn border_point(&self, dx: f64, dy: f64) -> (f64, f64) {
            let length = dx.hypot(dy).max(f64::EPSILON);
            let (dx, dy) = (dx / length, dy / length);
            let scale_x = self.half_width / dx.abs().max(f64::EPSILON);
            let scale_y = self.half_height / dy.abs().max(f64::EPSILON);
            let scale = scale_x.min(scale_y) + 2.0;
            (self.x + dx * scale, self.y + dy * scale)
        }
    }

    fn text_width(text: &str, size: f64) -> f64 {
        text.chars().count() as f64 * size * GLYPH_WIDTH
    }

    fn escape(text: &str) -> String {
        text.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
    }

    /// Splits `a, b, c` into lines of at most [`LABEL_LINE_CHARS`] characters.
    fn wrap(label: &str) -> Vec<String> {
        let mut lines: Vec<String> = Vec::new();
        for part in label.split(", ") {
            match lines.last_mut() {
                Some(line) if line.len() + 2 + part.len() <= LABEL_LINE_CHARS => {
                    line.push_str(", ");
                    line.push_str(part);
                }
                _ => lines.push(part.to_string()),
            }
        }
        lines
    }

    /// A node connected to at least half of the others goes in the centre (the EHR in a
    /// hospital): its edges become spokes instead of chords crossing the picture.
    fn hub(graph: &Graph) -> Option<usize> {
        let count = graph.nodes.len();
        if count < 4 {
            return None;
        }
        let degree = |node: usize| {
            let mut neighbours: Vec<usize> = graph
                .edges
                .iter()
                .filter_map(|edge| match (edge.from == node, edge.to == node) {
                    (true, false) => Some(edge.to),
                    (false, true) => Some(edge.from),
                    _ => None,
                })
                .collect();
            neighbours.sort_unstable();
            neighbours.dedup();
            neighbours.len()
        };
        (0..count)
            .map(|node| (degree(node), std::cmp::Reverse(node)))
            .max()
            .filter(|(degree, _)| 2 * degree >= count - 1)
            .map(|(_, std::cmp::Reverse(node))| node)
    }

    /// The nodes on the circle, ordered so that nodes with an edge between them (other than to
    /// the hub) sit close: pairwise swaps while they shorten the edges. Skipped for large graphs,
    /// where it would be slow and the picture is a list anyway.
    fn ring_order(graph: &Graph, hub: Option<usize>) -> Vec<usize> {
        let mut order: Vec<usize> = (0..graph.nodes.len())
            .filter(|&node| Some(node) != hub)
            .collect();
        let count = order.len();
        if count > 60 {
            return order;
        }
        let links: Vec<(usize, usize)> = graph
            .edges
            .iter()
            .filter(|edge| Some(edge.from) != hub && Some(edge.to) != hub)
            .map(|edge| (edge.from, edge.to))
            .collect();
        let cost = |order: &[usize]| -> usize {
            let position = |node: usize| order.iter().position(|&n| n == node).unwrap_or(0);
            links
                .iter()
                .map(|&(a, b)| {
                    let gap = position(a).abs_diff(position(b));
                    gap.min(count - gap)
                })
                .sum()
        };
        let mut best = cost(&order);
        for _pass in 0..20 {
            let mut improved = false;
            for i in 0..count {
                for j in i + 1..count {
                    order.swap(i, j);
                    let candidate = cost(&order);
                    if candidate < best {
                        best = candidate;
                        improved = true;
                    } else {
                        order.swap(i, j);
                    }
                }
            }
            if !improved {
                break;
            }
        }
        order
    }

    fn point_on_curve(
        start: (f64, f64),
        control: (f64, f64),
        end: (f64, f64),
        t: f64,
    ) -> (f64, f64) {
        let u = 1.0 - t;
        (
            u * u * start.0 + 2.0 * u * t * control.0 + t * t * end.0,
            u * u * start.1 + 2.0 * u * t * control.1 + t * t * end.1,
        )
    }

    pub(super) fn render(graph: &Graph) -> String {
        let labels: Vec<Vec<String>> = graph.nodes.iter().map(Graph::node_label).collect();
        let widest = labels
            .iter()
            .flatten()
            .map(|line| text_width(line, FONT_SIZE))
            .fold(60.0, f64::max);
        let tallest = labels.iter().map(Vec::len).max().unwrap_or(1) as f64;
        let node_width = widest + 24.0;
        let node_height = tallest * FONT_SIZE * LINE_HEIGHT + 14.0;
        let centre_node = hub(graph);
        let ring = ring_order(graph, centre_node);
        let ring_count = ring.len().max(1) as f64;
        // Room for every node on the circle, and for the edge labels inside it.
        let minimum_radius = if centre_node.is_some() { 340.0 } else { 280.0 };
        let radius = (ring_count * (node_width + 70.0) / (2.0 * PI)).max(minimum_radius);
        let title_height = 40.0;
        let notes_height = graph.notes.len() as f64 * 18.0 + 20.0;
        let notes_width = graph
            .notes
            .iter()
            .map(|note| text_width(note, 12.0) + 40.0)
            .fold(0.0, f64::max);
        let width = (2.0 * (radius + node_width / 2.0 + MARGIN)).max(notes_width);
        let height = 2.0 * (radius + node_height / 2.0 + MARGIN) + title_height + notes_height;
        let centre = (
            width / 2.0,
            title_height + MARGIN + radius + node_height / 2.0,
        );

        let mut places = vec![
            Rect {
                x: centre.0,
                y: centre.1,
                half_width: node_width / 2.0,
                half_height: node_height / 2.0,
            };
            graph.nodes.len()
        ];
        for (position, &node) in ring.iter().enumerate() {
            let angle = -PI / 2.0 + 2.0 * PI * position as f64 / ring_count;
            places[node].x = centre.0 + radius * angle.cos();
            places[node].y = centre.1 + radius * angle.sin();
        }

        let mut out = String::new();
        let _ = writeln!(
            out,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="Helvetica, Arial, sans-serif">"#
        );
        let _ = writeln!(out, "  <title>{}</title>", escape(&graph.title));
        let _ = writeln!(out, "  <defs>");
        for (index, colour) in PALETTE.iter().enumerate() {
            let _ = writeln!(
                out,
                r#"    <marker id="arrow{index}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="8" markerHeight="8" markerUnits="userSpaceOnUse" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="{colour}"/></marker>"#
            );
        }
        let _ = writeln!(out, "  </defs>");
        let _ = writeln!(out, r#"  <rect width="100%" height="100%" fill="white"/>"#);
        let _ = writeln!(
            out,
            r#"  <text x="{:.1}" y="30" font-size="18" font-weight="bold" text-anchor="middle">{}</text>"#,
            width / 2.0,
            escape(&graph.title)
        );

        // Edges, then their labels, then nodes: labels stay readable over crossing lines.
        let mut edge_paths = String::new();
        let mut edge_labels = String::new();
        let mut taken: Vec<Rect> = places
            .iter()
            .map(|place| Rect {
                half_width: place.half_width + 4.0,
                half_height: place.half_height + 4.0,
                ..*place
            })
            .collect();
        for edge in &graph.edges {
            let (from, to) = (places[edge.from], places[edge.to]);
            let (dx, dy) = (to.x - from.x, to.y - from.y);
            let length = dx.hypot(dy).max(1.0);
            let (normal_x, normal_y) = (-dy / length, dx / length);
            let middle = ((from.x + to.x) / 2.0, (from.y + to.y) / 2.0);
            // Edges of a pair bend to opposite sides (their normals are opposite).
            let reverse = graph
                .edges
                .iter()
                .any(|other| other.from == edge.to && other.to == edge.from);
            let mut bend = if reverse { PAIR_BEND } else { 0.0 };
            // Bend around a node in the way: the curve's middle is half its control offset.
            for (node, place) in places.iter().enumerate() {
                if node == edge.from || node == edge.to {
                    continue;
                }
                let along = ((place.x - from.x) * dx + (place.y - from.y) * dy) / (length * length);
                if !(0.0..=1.0).contains(&along) {
                    continue;
                }
                let side = (place.x - middle.0) * normal_x + (place.y - middle.1) * normal_y;
                let needed = place.radius() + CLEARANCE;
                let curve_side = bend / 2.0;
                if (curve_side - side).abs() < needed {
                    let away = if side > 0.0 { -1.0 } else { 1.0 };
                    bend = 2.0 * (side + away * needed);
                }
            }
            let control = (middle.0 + normal_x * bend, middle.1 + normal_y * bend);
            let start = from.border_point(control.0 - from.x, control.1 - from.y);
            let end = to.border_point(control.0 - to.x, control.1 - to.y);
            let colour_index = edge.from % PALETTE.len();
            let colour = PALETTE[colour_index];
            let _ = writeln!(
                edge_paths,
                r#"  <path d="M{:.1},{:.1} Q{:.1},{:.1} {:.1},{:.1}" fill="none" stroke="{colour}" stroke-width="1.6" marker-end="url(#arrow{colour_index})"/>"#,
                start.0, start.1, control.0, control.1, end.0, end.1
            );

            let lines = wrap(&edge.ports.to_string());
            let line_height = LABEL_FONT_SIZE * LINE_HEIGHT;
            let half_width = lines
                .iter()
                .map(|line| text_width(line, LABEL_FONT_SIZE))
                .fold(0.0, f64::max)
                / 2.0
                + 4.0;
            let half_height = (lines.len() as f64 * line_height + 4.0) / 2.0;
            // The first free place along the edge, from its middle outwards.
            let label = [0.5, 0.4, 0.6, 0.3, 0.7, 0.22, 0.78, 0.15, 0.85]
                .iter()
                .map(|&t| {
                    let (x, y) = point_on_curve(start, control, end, t);
                    Rect {
                        x,
                        y,
                        half_width,
                        half_height,
                    }
                })
                .min_by(|a, b| {
                    let crowding =
                        |rect: &Rect| taken.iter().map(|other| rect.overlap(other)).sum::<f64>();
                    crowding(a).total_cmp(&crowding(b))
                })
                .unwrap_or(Rect {
                    x: middle.0,
                    y: middle.1,
                    half_width,
                    half_height,
                });
            taken.push(label);
            let top = label.y - half_height;
            let _ = writeln!(
                edge_labels,
                r#"  <rect x="{:.1}" y="{top:.1}" width="{:.1}" height="{:.1}" rx="3" fill="white" fill-opacity="0.92" stroke="{colour}" stroke-width="0.6"/>"#,
                label.x - half_width,
                2.0 * half_width,
                2.0 * half_height
            );
            let _ = write!(
                edge_labels,
                r#"  <text x="{:.1}" y="{:.1}" font-size="{LABEL_FONT_SIZE}" text-anchor="middle" fill="{colour}">"#,
                label.x,
                top + 1.0 + LABEL_FONT_SIZE
            );
            for (number, line) in lines.iter().enumerate() {
                let dy = if number == 0 { 0.0 } else { line_height };
                let _ = write!(
                    edge_labels,
                    r#"<tspan x="{:.1}" dy="{dy:.1}">{}</tspan>"#,
                    label.x,
                    escape(line)
                );
            }
            let _ = writeln!(edge_labels, "</text>");
        }
        out.push_str(&edge_paths);
        out.push_str(&edge_labels);

        for ((node, label), place) in graph.nodes.iter().zip(&labels).zip(&places) {
            let dash = if node.mode == Mode::Monitor {
                r#" stroke-dasharray="6 4""#
            } else {
                ""
            };
            let (rx, fill) = match node.kind {
                NodeKind::Segment => (8.0, "#eef4fb"),
                NodeKind::World => (place.half_height, "#f0f0f0"),
                NodeKind::Cidr => (place.half_height, "#fff4dc"),
            };
            let _ = writeln!(
                out,
                r##"  <rect x="{:.1}" y="{:.1}" width="{node_width:.1}" height="{node_height:.1}" rx="{rx:.1}" fill="{fill}" stroke="#333" stroke-width="1.4"{dash}/>"##,
                place.x - place.half_width,
                place.y - place.half_height
            );
            let line_height = FONT_SIZE * LINE_HEIGHT;
            let first_y =
                place.y - (label.len() as f64 - 1.0) * line_height / 2.0 + FONT_SIZE * 0.35;
            for (number, line) in label.iter().enumerate() {
                let (weight, size) = if number == 0 {
                    ("bold", FONT_SIZE)
                } else {
                    ("normal", FONT_SIZE - 2.0)
                };
                let _ = writeln!(
                    out,
                    r#"  <text x="{:.1}" y="{:.1}" font-size="{size}" font-weight="{weight}" text-anchor="middle">{}</text>"#,
                    place.x,
                    first_y + number as f64 * line_height,
                    escape(line)
                );
            }
        }

        let notes_top = height - notes_height + 10.0;
        for (number, note) in graph.notes.iter().enumerate() {
            let _ = writeln!(
                out,
                r##"  <text x="20" y="{:.1}" font-size="12" fill="#444">{}</text>"##,
                notes_top + number as f64 * 18.0,
                escape(note)
            );
        }
        let _ = writeln!(out, "</svg>");
        out
    }
}
