# envelope: from=alice@example.org to=customer+orders@example.com message=messages/multipart.eml
require ["fileinto", "subaddress"];
if address :detail :is "to" "orders" {
  fileinto "yes";
} else {
  fileinto "no";
}
