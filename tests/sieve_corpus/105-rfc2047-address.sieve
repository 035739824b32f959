# envelope: from=alice@example.org to=francois@example.fr message=messages/encoded.eml
require ["fileinto"];
if address :is "from" "juergen@example.de" {
  fileinto "yes";
} else {
  fileinto "no";
}
