fn main() {
    print!("{}", walden_operator::api::crds_yaml().unwrap());
}
