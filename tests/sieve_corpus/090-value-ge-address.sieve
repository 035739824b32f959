# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto", "relational"];
if address :value "ge" :domain "from" "example.org" {
  fileinto "yes";
} else {
  fileinto "no";
}
